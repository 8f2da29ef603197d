"""The source stage's parts on their own (no broker): the event-time aligner, the join fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from kafka import TopicPartition
from kafka.future import Future

from worker.kafka_join import _AwaitedOnce
from worker.source import EventTimeAligner

CLICKS, ORDERS = TopicPartition("clicks", 0), TopicPartition("orders", 0)


class Rec(NamedTuple):
    offset: int
    timestamp: int


def records(offsets: range, timestamps: list[int]) -> list[Rec]:
    return [Rec(o, t) for o, t in zip(offsets, timestamps, strict=True)]


def to_come(**left: int | None) -> Callable[[TopicPartition], int | None]:
    """Records each partition has still to come, by topic name."""
    return lambda tp: left[tp.topic]


def taken(
    aligner: EventTimeAligner,
    left: Callable[[TopicPartition], int | None],
    now: float = 0.0,
    limit: int = 100,
) -> list[tuple[str, int]]:
    return [(tp.topic, r.timestamp) for tp, r in aligner.take(left, now, limit)]  # type: ignore[attr-defined]


def test_records_ahead_of_a_partition_still_catching_up_wait_for_it() -> None:
    aligner = EventTimeAligner(max_wait_s=5, slack=10)
    aligner.track([CLICKS, ORDERS], now=0)
    # the orders partition raced ahead: its records reach t=90 while clicks are at t=30
    aligner.add({ORDERS: records(range(3), [15, 50, 90])}, now=0)  # type: ignore[dict-item]
    aligner.add({CLICKS: records(range(4), [0, 10, 20, 30])}, now=0)  # type: ignore[dict-item]
    first = taken(aligner, to_come(clicks=500, orders=0))
    assert first == [("clicks", 0), ("clicks", 10), ("orders", 15), ("clicks", 20), ("clicks", 30)]
    aligner.add({CLICKS: records(range(4, 7), [40, 60, 95])}, now=0)  # type: ignore[dict-item]
    assert taken(aligner, to_come(clicks=500, orders=0)) == [
        ("clicks", 40), ("orders", 50), ("clicks", 60), ("orders", 90), ("clicks", 95)
    ]  # fmt: skip


def test_a_partition_with_little_to_come_holds_nothing_back() -> None:
    """A worker that keeps up must not wait a poll for a fetch that has not answered."""
    aligner = EventTimeAligner(max_wait_s=5, slack=10)
    aligner.track([CLICKS, ORDERS], now=0)
    aligner.add({CLICKS: records(range(2), [0, 10]), ORDERS: records(range(2), [50, 90])}, now=0)  # type: ignore[dict-item]
    assert len(taken(aligner, to_come(clicks=10, orders=0))) == 4


def test_a_silent_partition_stops_holding_the_others_after_the_wait() -> None:
    aligner = EventTimeAligner(max_wait_s=5, slack=10)
    aligner.track([CLICKS, ORDERS], now=0)
    aligner.add({ORDERS: records(range(2), [50, 90])}, now=0)  # type: ignore[dict-item]
    # clicks: never fetched yet (nothing known about it), then known to lag but silent
    assert taken(aligner, to_come(clicks=None, orders=0), now=4) == []
    assert taken(aligner, to_come(clicks=500, orders=0), now=4.9) == []
    assert taken(aligner, to_come(clicks=500, orders=0), now=5.1) == [
        ("orders", 50),
        ("orders", 90),
    ]


def test_a_take_hands_out_at_most_the_limit_and_keeps_the_rest_in_order() -> None:
    aligner = EventTimeAligner(max_wait_s=5, slack=10)
    aligner.track([CLICKS, ORDERS], now=0)
    # within a partition, offsets keep their order even where timestamps go back
    aligner.add(
        {CLICKS: records(range(4), [0, 30, 20, 40]), ORDERS: records(range(2), [10, 35])}, now=0
    )  # type: ignore[dict-item]
    left = to_come(clicks=0, orders=0)
    first = aligner.take(left, 0, limit=3)
    second = aligner.take(left, 0, limit=3)
    assert [(tp.topic, r.offset) for tp, r in first + second] == [  # type: ignore[attr-defined]
        ("clicks", 0), ("orders", 0), ("clicks", 1), ("clicks", 2), ("orders", 1), ("clicks", 3)
    ]  # fmt: skip


def test_partitions_holding_a_polls_worth_are_reported_for_pausing() -> None:
    aligner = EventTimeAligner(max_wait_s=5, slack=10)
    aligner.track([CLICKS, ORDERS], now=0)
    aligner.add({ORDERS: records(range(3), [50, 60, 90])}, now=0)  # type: ignore[dict-item]
    assert aligner.holding(3) == {ORDERS}
    assert taken(aligner, to_come(clicks=500, orders=0)) == []
    assert len(taken(aligner, to_come(clicks=0, orders=0))) == 3
    assert aligner.holding(1) == set()


def test_forgotten_partitions_are_dropped_with_what_they_held() -> None:
    aligner = EventTimeAligner(max_wait_s=5, slack=10)
    aligner.track([CLICKS, ORDERS], now=0)
    aligner.add({ORDERS: records(range(2), [50, 90]), CLICKS: records(range(1), [0])}, now=0)  # type: ignore[dict-item]
    aligner.forget([CLICKS])  # revoked: it no longer holds the orders back, and is gone
    assert taken(aligner, to_come(clicks=500, orders=0)) == [("orders", 50), ("orders", 90)]


def views_and_orders(wait_s: float = 1.0) -> EventTimeAligner:
    return EventTimeAligner(max_wait_s=5, slack=10, orders_topic="orders", orders_wait_s=wait_s)


def test_orders_wait_for_the_views_before_them_even_when_caught_up() -> None:
    """Fetched out of phase, a worker that keeps up would learn the orders in batches
    of their own; they wait until the clicks have been fetched past them."""
    aligner = views_and_orders()
    aligner.track([CLICKS, ORDERS], now=0)
    aligner.add({ORDERS: records(range(2), [15, 50]), CLICKS: records(range(2), [0, 10])}, now=0)  # type: ignore[dict-item]
    caught_up = to_come(clicks=0, orders=0)
    assert taken(aligner, caught_up, now=0.1) == [("clicks", 0), ("clicks", 10)]
    assert not aligner.ready(caught_up, now=0.1)
    aligner.add({CLICKS: records(range(2, 4), [20, 40])}, now=0.2)  # type: ignore[dict-item]
    assert aligner.ready(caught_up, now=0.2)
    assert taken(aligner, caught_up, now=0.2) == [("orders", 15), ("clicks", 20), ("clicks", 40)]


def test_orders_wait_for_every_clicks_partition_heard_from_lately() -> None:
    other_clicks = TopicPartition("clicks", 1)
    aligner = views_and_orders(wait_s=1.0)
    aligner.track([CLICKS, other_clicks, ORDERS], now=0)
    aligner.add({CLICKS: records(range(1), [60])}, now=0)  # type: ignore[dict-item]
    aligner.add({other_clicks: records(range(1), [30])}, now=0.5)  # type: ignore[dict-item]
    aligner.add({ORDERS: records(range(1), [50])}, now=0.6)  # type: ignore[dict-item]
    caught_up = to_come(clicks=0, orders=0)
    assert taken(aligner, caught_up, now=0.6) == [("clicks", 30), ("clicks", 60)]
    aligner.add({CLICKS: records(range(1, 2), [70])}, now=1.4)  # type: ignore[dict-item]
    assert taken(aligner, caught_up, now=1.4) == [("clicks", 70)]  # clicks-1 still at 30
    # clicks-1 has delivered nothing for a second: it no longer holds the order back,
    # though the order itself has waited less than its wait
    assert taken(aligner, caught_up, now=1.55) == [("orders", 50)]


def test_an_order_waits_at_most_the_orders_wait() -> None:
    """Say the clicks' producer clock runs behind: the orders are late, not stuck."""
    aligner = views_and_orders(wait_s=1.0)
    aligner.track([CLICKS, ORDERS], now=0)
    aligner.add({ORDERS: records(range(2), [50, 90])}, now=0)  # type: ignore[dict-item]
    for offset, now in enumerate((0.3, 0.6, 0.9)):  # the clicks keep coming, behind
        aligner.add({CLICKS: records(range(offset, offset + 1), [int(now * 10)])}, now=now)  # type: ignore[dict-item]
    caught_up = to_come(clicks=0, orders=0)
    assert taken(aligner, caught_up, now=0.9) == [("clicks", 3), ("clicks", 6), ("clicks", 9)]
    assert taken(aligner, caught_up, now=1.0) == [("orders", 50), ("orders", 90)]


def test_orders_wait_only_as_far_as_alignment_lets_them_go() -> None:
    """The orders' wait adds to the alignment of a backlog; it never lets a record
    ahead of a partition still catching up go early."""
    aligner = views_and_orders(wait_s=0.1)
    aligner.track([CLICKS, ORDERS], now=0)
    aligner.add({ORDERS: records(range(1), [50]), CLICKS: records(range(1), [10])}, now=0)  # type: ignore[dict-item]
    assert taken(aligner, to_come(clicks=500, orders=0), now=1) == [("clicks", 10)]


def test_a_finished_join_reads_as_pending_and_awaiting_it_gives_its_assignment() -> None:
    task = _AwaitedOnce(Future().success(b"assignment"))
    assert not task.is_done  # so the coordinator awaits it instead of joining again
    waiting = task.__await__()
    try:
        next(waiting)
    except StopIteration as done:
        assert done.value == b"assignment"
    else:
        raise AssertionError("a finished join should not wait")
    got: list[bytes] = []
    task.add_callback(got.append)  # the poll's timed wait, on a finished task
    assert got == [b"assignment"]
