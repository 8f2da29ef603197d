"""The Kafka side of the loop: consume in batches, follow rebalances, commit offsets.

While it catches up, the worker hands records to the app in Kafka-timestamp order across
partitions (`EventTimeAligner`), not a run of one partition and then the next; and a
purchase waits for the clicks before it, caught up or not.

Offsets are committed only by `commit()`, which the app calls after the batch's Redis
write succeeded. On assignment the consumer resumes right after the offset Redis says it
has applied, when Redis knows one, else from Kafka's committed offset. Redis is the
state, so its offset is the truth: ahead of Kafka's after a crash between the Redis
write and the commit (nothing is replayed), behind it only if Redis lost writes (then
the replay rebuilds exactly what was lost, the per-user fences skipping the rest).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from config.settings import KafkaSettings
from worker import kafka_join
from worker.metrics import Metrics
from worker.profiles import Position
from worker.retry import Backoff, Permanent

log = logging.getLogger(__name__)
kafka_join.install()

FETCHED_AT_ONCE = 1_000_000  # records per consumer poll: whatever the fetcher holds


class TopicLayoutError(Permanent):
    """The input topics cannot be consumed correctly as they are laid out."""


@dataclass(frozen=True, slots=True)
class Record:
    position: Position
    key: bytes | None
    value: bytes | None
    appended_at: float  # the record's Kafka timestamp, in seconds


def kafka_client_config(settings: KafkaSettings) -> dict[str, object]:
    """Connection settings shared by the consumer, producers and admin client."""
    config: dict[str, object] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.sasl_mechanism:
        config |= {
            "sasl_mechanism": settings.sasl_mechanism,
            "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": settings.sasl_password,
        }
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(settings, name):
            config[name] = getattr(settings, name)
    return config


def consumer_config(settings: KafkaSettings) -> dict[str, object]:
    """The worker's consumer settings (also the benchmark's bare consumer's)."""
    return kafka_client_config(settings) | {
        "enable_auto_commit": False,
        "auto_offset_reset": settings.auto_offset_reset,
        "max_poll_records": settings.max_poll_records,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        # Range assignment gives partition p of both input topics to the same worker, so
        # each user's clicks and orders meet in one profile.
        "partition_assignment_strategy": [RangePartitionAssignor],
    }


Held = tuple[ConsumerRecord, float]  # a fetched record, and when it was fetched (monotonic)


class EventTimeAligner:
    """Holds back fetched records that are ahead of a partition still catching up, and
    hands out the rest merged in timestamp order (each partition's in offset order).

    Why: a consumer catching up on a backlog reads each partition as fast as it can, so
    partitions drift apart. Measured on the benchmark's warm-up: the purchases topic,
    with a twentieth of the records, ran ten days of event time ahead of the clicks, so
    shoppers bought days before the views that led to it, and the drift detectors fired
    80-98 times over the first 15 days of event time of a shop that did not change
    (three runs; aligned, 5 and 16; the whole shop replayed in exact order, 6). Kafka
    Streams synchronizes its partitions the same way (by the record timestamps,
    `max.task.idle.ms`).

    The mark is the latest timestamp fetched from the slowest partition that is still
    catching up: more than `slack` records to come (in the fetcher or on the broker).
    Nothing later is handed out until that partition has caught up to it. One with fewer
    to come holds nothing back: its next fetch brings them all, and a worker that keeps
    up would otherwise wait a poll for whichever partitions' fetch had not answered yet
    (holding for any record to come, one run of a stationary load at 10,287 events/s
    measured 214 ms at p50, where runs without holding measured 72-140). Nor does one
    that has delivered nothing for `max_wait_s`: a stuck leader must not stall the
    others.

    Records of the `orders_topic` also wait, even once caught up, until every other
    partition has been fetched past their timestamp: an order comes after the views
    that led to it. Why: kafka-python fetches the topics of a worker that keeps up out of
    phase, so without the wait the purchases came in batches of their own, every profile
    learned from one a buyer's, and the `feature` detector took each such batch for
    drift (in a benchmark stage paced at 10,287 events/s, 30 and 70 detections after the
    warm-up without the wait, 2, 14 and 9 with it). An order waits at most
    `orders_wait_s`, and a partition that has delivered nothing for that long does not
    hold orders back: a quiet shop's orders are not delayed more than that.
    """

    def __init__(
        self,
        max_wait_s: float,
        slack: int,
        orders_topic: str | None = None,
        orders_wait_s: float = 0.0,
    ) -> None:
        self._max_wait = max_wait_s
        self._slack = slack
        self._orders_topic = orders_topic
        self._orders_wait = orders_wait_s
        self._held: dict[TopicPartition, deque[Held]] = {}
        self._latest: dict[TopicPartition, int] = {}  # timestamp of the latest fetched
        self._heard: dict[TopicPartition, float] = {}  # when it last delivered (monotonic)

    def track(self, partitions: Iterable[TopicPartition], now: float) -> None:
        """Newly assigned partitions: wait for their first fetch (up to `max_wait_s`)."""
        for tp in partitions:
            self._heard[tp] = now

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions revoked or rewound: their held records will be fetched again."""
        for tp in partitions:
            self._held.pop(tp, None)
            self._latest.pop(tp, None)
            self._heard.pop(tp, None)

    def add(self, fetched: dict[TopicPartition, list[ConsumerRecord]], now: float) -> None:
        for tp, records in fetched.items():
            if records:
                self._held.setdefault(tp, deque()).extend((r, now) for r in records)
                self._latest[tp] = max(self._latest.get(tp, -1), records[-1].timestamp)
                self._heard[tp] = now

    def take(
        self, to_come: Callable[[TopicPartition], int | None], now: float, limit: int
    ) -> list[tuple[TopicPartition, ConsumerRecord]]:
        """Up to `limit` records that may go now, in timestamp order. `to_come`: how many
        records a partition has in the fetcher and on the broker (None: not known yet)."""
        may_go = self._gate(to_come, now)
        heads = [
            (held[0][0].timestamp, n, tp)
            for n, (tp, held) in enumerate(self._held.items())
            if held and may_go(tp, held[0])
        ]
        heapq.heapify(heads)
        taken: list[tuple[TopicPartition, ConsumerRecord]] = []
        while heads and len(taken) < limit:
            _, n, tp = heads[0]
            held = self._held[tp]
            taken.append((tp, held.popleft()[0]))
            if held and may_go(tp, held[0]):
                heapq.heapreplace(heads, (held[0][0].timestamp, n, tp))
            else:
                heapq.heappop(heads)
        return taken

    def ready(self, to_come: Callable[[TopicPartition], int | None], now: float) -> bool:
        """Whether some held record may be handed out now."""
        may_go = self._gate(to_come, now)
        return any(held and may_go(tp, held[0]) for tp, held in self._held.items())

    def holding(self, at_least: int) -> set[TopicPartition]:
        """Partitions holding at least this many records: to pause, so memory stays
        bounded while another partition catches up."""
        return {tp for tp, held in self._held.items() if len(held) >= at_least}

    def _gate(
        self, to_come: Callable[[TopicPartition], int | None], now: float
    ) -> Callable[[TopicPartition, Held], bool]:
        """Whether a partition's next held record may go now."""
        mark = self._mark(to_come, now)
        viewed = self.fetched_to(now, skip=self._orders_topic)  # the views before an order

        def may_go(tp: TopicPartition, held: Held) -> bool:
            record, fetched_at = held
            if record.timestamp > mark:
                return False
            return (
                tp.topic != self._orders_topic
                or record.timestamp <= viewed
                or now - fetched_at >= self._orders_wait
            )

        return may_go

    def _mark(self, to_come: Callable[[TopicPartition], int | None], now: float) -> float:
        """The latest timestamp of the slowest partition still catching up."""
        behind = [
            self._latest.get(tp, -math.inf)
            for tp, heard in self._heard.items()
            if now - heard <= self._max_wait and self._catching_up(to_come(tp))
        ]
        return min(behind, default=math.inf)

    def _catching_up(self, to_come: int | None) -> bool:
        return to_come is None or to_come > self._slack

    def fetched_to(self, now: float, skip: str | None = None) -> float:
        """The timestamp every partition (but those of topic `skip`) that delivered within
        `orders_wait_s` has been fetched to: nothing stamped earlier is still to come,
        but from a partition quiet for longer."""
        lively = [
            self._latest.get(tp, -math.inf)
            for tp, heard in self._heard.items()
            if tp.topic != skip and now - heard <= self._orders_wait
        ]
        return min(lively, default=math.inf)


class KafkaSource:
    def __init__(
        self,
        settings: KafkaSettings,
        metrics: Metrics,
        backoff: Backoff,
        applied_offsets: Callable[[list[tuple[str, int]]], dict[tuple[str, int], int]],
        on_revoked: Callable[[set[tuple[str, int]]], None],
        on_assigned: Callable[[dict[tuple[str, int], int | None]], None] = lambda _: None,
    ) -> None:
        """`applied_offsets` maps partitions to the last offset Redis has applied;
        `on_revoked` lets the app forget state of partitions it lost, `on_assigned` tells
        it what Redis has applied in the partitions it got."""
        self._settings = settings
        self._metrics = metrics
        self._backoff = backoff
        self._applied_offsets = applied_offsets
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned
        self._consumer: KafkaConsumer | None = None
        self._next: dict[TopicPartition, int] = {}
        self._to_commit: dict[TopicPartition, OffsetAndMetadata] = {}
        self._aligner = (
            EventTimeAligner(
                settings.align_max_wait_ms / 1000,
                settings.max_poll_records,
                settings.purchases_topic if settings.purchases_wait_ms else None,
                settings.purchases_wait_ms / 1000,
            )
            if settings.align_max_wait_ms
            else None
        )

    def connect(self) -> None:
        """Join the consumer group, retrying while no broker answers."""
        s = self._settings
        self._consumer = self._backoff.call(
            f"connecting to Kafka at {s.bootstrap_servers}",
            lambda: KafkaConsumer(**consumer_config(s), group_id=s.group_id),
            retry_on=(KafkaError,),
            on_error=lambda _: self._metrics.kafka_errors.labels("connect").inc(),
        )
        self._check_co_partitioned()
        self._consumer.subscribe(list(s.input_topics), listener=_Listener(self))
        log.info("joined consumer group %s for topics %s", s.group_id, ", ".join(s.input_topics))

    def _check_co_partitioned(self) -> None:
        """Both input topics must exist with the same partition count (see connect)."""

        def counts() -> dict[str, int]:
            found = {t: self.consumer.partitions_for_topic(t) for t in self._settings.input_topics}
            missing = [t for t, partitions in found.items() if not partitions]
            if missing:
                raise KafkaError(f"topic(s) {', '.join(missing)} do not exist yet")
            return {t: len(partitions) for t, partitions in found.items()}

        found = self._backoff.call("finding the input topics", counts, retry_on=(KafkaError,))
        if len(set(found.values())) > 1:
            raise TopicLayoutError(
                "the input topics must have the same number of partitions, so that a "
                f"user's clicks and purchases reach the same worker; found {found}"
            )

    @property
    def consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaSource.connect() was not called")
        return self._consumer

    @property
    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment()) if self._consumer else set()

    def poll(self) -> list[Record]:
        """One batch of records; empty on timeout or broker trouble. Aligned (the
        default), in timestamp order as far as every partition still catching up has
        come (`EventTimeAligner`); else as fetched, a run of one partition at a time."""
        aligner = self._aligner
        try:
            # Aligned, everything the fetcher has: the aligner hands out
            # `max_poll_records` at a time. Records left in the fetcher would be parked
            # when their partition is paused, and kafka-python 3.0 does not always hand
            # parked records back (all four clickstream partitions stalled in a test).
            started = time.monotonic()
            ready = aligner is not None and aligner.ready(self._to_come, started)
            batches = self.consumer.poll(
                timeout_ms=0 if ready else self._settings.poll_timeout_ms,
                max_records=self._settings.max_poll_records if aligner is None else FETCHED_AT_ONCE,
            )
            self._metrics.poll_wait.observe(time.monotonic() - started)
        except KafkaError as exc:
            self._metrics.kafka_errors.labels("poll").inc()
            log.warning("poll failed (%s); the consumer will reconnect", exc)
            return []
        now = time.time()
        records = []
        fetched = _as_fetched(batches) if aligner is None else self._aligned(aligner, batches)
        for tp, m in fetched:
            appended = m.timestamp / 1000 if m.timestamp and m.timestamp > 0 else now
            records.append(
                Record(Position(tp.topic, tp.partition, m.offset), m.key, m.value, appended)
            )
            self._next[tp] = m.offset + 1
        return records

    def _aligned(
        self, aligner: EventTimeAligner, batches: dict[TopicPartition, list[ConsumerRecord]]
    ) -> list[tuple[TopicPartition, ConsumerRecord]]:
        """What the aligner hands out now; partitions that run ahead are paused (only
        the aligner pauses, so the consumer's paused set is its own)."""
        aligner.add(batches, time.monotonic())
        limit = self._settings.max_poll_records
        taken = aligner.take(self._to_come, time.monotonic(), limit)
        ahead = aligner.holding(limit) & self.assignment
        paused = set(self.consumer.paused())
        if ahead - paused:
            self.consumer.pause(*(ahead - paused))
        if paused - ahead:
            self.consumer.resume(*(paused - ahead))
        return taken

    def fetched_to(self) -> float:
        """The Kafka timestamp (s) every partition that delivered lately has been fetched
        to (`EventTimeAligner.fetched_to`): a record stamped no later is already here,
        unless its partition has been quiet for `purchases_wait_ms`. Unaligned, or with
        purchases that do not wait, there is no such mark: infinity."""
        if self._aligner is None or not self._settings.purchases_wait_ms:
            return math.inf
        return self._aligner.fetched_to(time.monotonic()) / 1000

    def _to_come(self, tp: TopicPartition) -> int | None:
        """Records of a partition not yet polled (in the fetcher or on the broker), as of
        its last fetch; None before its first."""
        highwater = self.consumer.highwater(tp)
        return None if highwater is None else max(highwater - self.consumer.position(tp), 0)

    def commit(self, positions: dict[tuple[str, int], int]) -> None:
        """Commit 'next offset to read' per partition, without waiting for the broker.

        Redis already holds the batch, and a new owner resumes from Redis's offsets, so
        the Kafka commit only has to catch up (for lag tools, and for a Redis that lost
        writes): a failed commit is counted and covered by the next one, and `close`
        commits the last offsets synchronously.
        """
        offsets = {
            TopicPartition(topic, partition): OffsetAndMetadata(offset + 1, "", -1)
            for (topic, partition), offset in positions.items()
        }
        self._to_commit.update(offsets)
        self.consumer.commit_async(offsets, callback=self._committed)

    def _committed(self, offsets: object, result: object) -> None:
        if isinstance(result, Exception):
            self._metrics.kafka_errors.labels("commit").inc()
            log.debug("asynchronous commit failed (%s); the next one covers it", result)

    def _commit_last(self) -> None:
        """The last offsets of partitions still owned, committed synchronously."""
        owned = {tp: o for tp, o in self._to_commit.items() if tp in self.assignment}
        if not owned:
            return
        try:
            self.consumer.commit(owned)
        except KafkaError as exc:  # Redis's offsets still say where to resume
            self._metrics.kafka_errors.labels("commit").inc()
            log.warning("final commit failed (%s); the next owner resumes from Redis", exc)

    def rewind(
        self, applied: dict[tuple[str, int], int], first: dict[tuple[str, int], int]
    ) -> None:
        """Seek each still-assigned partition of a discarded batch back to the record after
        the last one Redis applied (or to the batch's start if Redis has none)."""
        assigned = self.assignment
        for (topic, partition), start in first.items():
            tp = TopicPartition(topic, partition)
            if tp in assigned:
                last = applied.get((topic, partition))
                self.consumer.seek(tp, last + 1 if last is not None else start)
                self._realign([tp], owned=True)

    def _realign(self, partitions: Iterable[TopicPartition], owned: bool) -> None:
        """Partitions assigned, rewound (`owned`) or revoked: what the aligner held of
        them is dropped, to be fetched again from where they now stand."""
        if self._aligner is not None:
            self._aligner.forget(partitions)
            if owned:
                self._aligner.track(partitions, time.monotonic())

    def update_lag(self) -> None:
        """Lag from the high watermark the last fetch reported: no extra broker call."""
        for tp in self.assignment:
            highwater = self.consumer.highwater(tp)
            if highwater is not None and tp in self._next:
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(
                    max(highwater - self._next[tp], 0)
                )

    def close(self) -> None:
        if self._consumer is not None:
            self._commit_last()
            self._consumer.close(autocommit=False)
            self._consumer = None

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        self._metrics.assigned_partitions.set(len(self.assignment))
        applied = self._applied_offsets([(tp.topic, tp.partition) for tp in partitions])
        for tp in partitions:
            self._metrics.lag.labels(tp.topic, str(tp.partition)).set(0)
            last = applied.get((tp.topic, tp.partition))
            if last is not None:
                self.consumer.seek(tp, last + 1)
        self._realign(partitions, owned=True)
        log.info("assigned %s", _names(partitions))
        self._on_assigned(
            {(tp.topic, tp.partition): applied.get((tp.topic, tp.partition)) for tp in partitions}
        )

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        self._realign(partitions, owned=False)
        for tp in partitions:
            self._next.pop(tp, None)
            self._to_commit.pop(tp, None)
            with contextlib.suppress(KeyError):
                self._metrics.lag.remove(tp.topic, str(tp.partition))
        self._on_revoked({(tp.topic, tp.partition) for tp in partitions})
        self._metrics.assigned_partitions.set(len(self.assignment) - len(partitions))
        log.info("revoked %s", _names(partitions))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._source._assigned(assigned)

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._source._revoked(revoked)


def _as_fetched(
    batches: dict[TopicPartition, list[ConsumerRecord]],
) -> list[tuple[TopicPartition, ConsumerRecord]]:
    return [(tp, m) for tp, messages in batches.items() for m in messages]


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}-{tp.partition}" for tp in sorted(partitions)) or "nothing"


def ensure_topics(settings: KafkaSettings, partitions: int) -> None:
    """Create the input and output topics that do not exist yet (demo, tests, backfills)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**kafka_client_config(settings))
    try:
        existing = set(admin.list_topics())
        wanted = [
            *settings.input_topics,
            settings.dlq_topic,
            settings.changes_topic,
            settings.lifecycle_topic,
        ]
        missing = [NewTopic(t, partitions, 1) for t in wanted if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(missing)
    finally:
        admin.close()


def delete_topics(settings: KafkaSettings, prefix: str, groups: Iterable[str] = ()) -> None:
    """Delete the topics named `prefix`… and these consumer groups: what a bench or
    evaluation run made on servers it was given."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**kafka_client_config(settings))
    try:
        if mine := [topic for topic in admin.list_topics() if topic.startswith(prefix)]:
            admin.delete_topics(mine)
        if groups := sorted(groups):
            admin.delete_groups(groups)
    finally:
        admin.close()
