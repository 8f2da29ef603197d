"""The training thread: the leader's learning, off the consumer loop, in order."""

from __future__ import annotations

import threading

import pytest

from worker.coordination import TrainingThread


def held(training: TrainingThread) -> threading.Event:
    """Hand over work that holds the thread until the returned event is set."""
    started, free = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        free.wait(30)

    training.submit(hold)
    assert started.wait(30)
    return free


def test_work_runs_in_the_order_handed_over_and_drain_waits_for_all_of_it() -> None:
    training = TrainingThread()
    free = held(training)
    done: list[int] = []
    for n in range(50):  # fewer than `max_pending`
        training.submit(lambda n=n: done.append(n))  # type: ignore[misc]
    assert done == []  # handed over, not run: the loop did not wait
    free.set()
    training.drain()
    assert done == list(range(50))
    training.close()


def test_a_full_queue_makes_the_loop_wait_instead_of_growing() -> None:
    training = TrainingThread(max_pending=2)
    free = held(training)
    training.submit(lambda: None)
    training.submit(lambda: None)
    handed = threading.Event()
    third = threading.Thread(target=lambda: (training.submit(lambda: None), handed.set()))
    third.start()
    assert not handed.wait(0.3)  # two wait already: the third hand-over blocks
    free.set()
    assert handed.wait(30)
    third.join()
    training.drain()
    training.close()


def test_a_failure_is_raised_on_the_loop_and_stops_the_training() -> None:
    training = TrainingThread()
    ran: list[str] = []

    def fail() -> None:
        raise ValueError("a model that cannot learn")

    training.submit(fail)
    training.submit(lambda: ran.append("after"))
    with pytest.raises(RuntimeError, match="training failed") as raised:
        training.drain()
    assert isinstance(raised.value.__cause__, ValueError)
    assert ran == []  # nothing learns on from a model left half-updated
    with pytest.raises(RuntimeError):
        training.submit(lambda: None)
    training.close()
