"""A fix for kafka-python 3.0's group join, which can throw away a join that succeeded.

kafka-python 3.0 runs a JoinGroup → SyncGroup attempt as a task on its network thread;
`consumer.poll` awaits it only until the poll's timeout, then leaves it running for the
next poll. But the next poll sends a *new* JoinGroup if the task has finished meanwhile
(`BaseCoordinator.join_group_async`: "`_join_task is None or _join_task.is_done`"), and
drops the assignment it got. A consumer whose join finishes between its polls (while
it works on a batch, or in the same tick its poll times out) rejoins again and again:
each round costs a broker's rebalance delay (3 s on Tansu), and on Kafka (by its group
protocol; not tried here) the leader's rejoin starts a rebalance of the whole group.
A test consumer doing 0.37 s of work per 100 ms poll never got its partitions in 40 s.

Java's consumer completes a join that finished while nobody was waiting. So does this
fix: a join task is replaced only after a poll has awaited it. A finished task reads as
pending to that one check; awaiting it returns its assignment (or raises its error) at
once, and every way out of the await clears the task, as the library already does.
Remove it once kafka-python takes up a finished join itself (3.0.12, the latest release
on 2026-12-02, does not): `tests/test_pipeline.py` has the test that shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from kafka.coordinator.base import BaseCoordinator
from kafka.future import Future


class _AwaitedOnce:
    """A join task that reads as pending until a poll has awaited it."""

    __slots__ = ("_task",)
    is_done = False

    def __init__(self, task: Future) -> None:
        self._task = task

    def add_callback(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        return self._task.add_callback(f, *args, **kwargs)

    def add_errback(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        return self._task.add_errback(f, *args, **kwargs)

    def __await__(self) -> Generator[Any, None, Any]:
        return (yield from self._task.__await__())


def _get(coordinator: BaseCoordinator) -> _AwaitedOnce | None:
    task: _AwaitedOnce | None = coordinator.__dict__.get("_join_task")
    return task


def _set(coordinator: BaseCoordinator, task: Future | None) -> None:
    coordinator.__dict__["_join_task"] = None if task is None else _AwaitedOnce(task)


def install() -> None:
    """Route `BaseCoordinator._join_task` through `_AwaitedOnce` (idempotent)."""
    if not isinstance(BaseCoordinator.__dict__.get("_join_task"), property):
        BaseCoordinator._join_task = property(_get, _set)
