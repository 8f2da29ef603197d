"""Wires the stages from the settings and runs the loop: poll → process → write → commit.

Per poll batch, in order:
  source (Kafka records) → decode (event or dead letter) → profile (fold, fenced)
  → features → model (assign + learn) → drift → sink (Kafka outbox, then one Redis
  transaction) → commit (Kafka offsets).
Nothing is committed before Redis holds the result, so a crash anywhere replays, and
the fences in Redis make the replay change nothing twice. Between batches the worker
syncs the model through Redis (`coordination.py`): one worker trains and publishes, all
assign with the published revision. Once the model has settled, it also places every
user of its partitions afresh, a chunk between batches (`_watch_settling`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

from config.settings import Settings
from schemas.events import ClickEvent, PurchaseEvent, UserDeleted
from schemas.records import SegmentChange, UserSegment
from worker.coordination import ModelCoordinator
from worker.decode import REASONS, DeadLetter, Decoded, Decoder
from worker.drift import DriftReport, InEventTime
from worker.features import FeatureExtractor
from worker.health import HealthServer
from worker.learning import LearningWindows
from worker.metrics import Metrics
from worker.model import Assignment, SegmentModel
from worker.profiles import HOUR_MS, Profile, ProfileCache, ProfileUpdater
from worker.retry import Backoff, Stopped
from worker.sink import (
    BatchWrite,
    KafkaOutbox,
    RedisStore,
    SegmentSnapshot,
    StaleBatch,
    connect,
)
from worker.source import KafkaSource, Record

log = logging.getLogger(__name__)

# Users placed per write outside a poll batch: those who waited for a model (`_place_waiting`)
# and, once the model has settled, everyone (`_watch_settling`). Bounds the users and
# profiles held at once, and the size of one Redis transaction.
PLACE_CHUNK = 2_000
Scanner = Callable[[int, int], tuple[int, list[str]]]  # (cursor, count) -> (cursor, ids)


@dataclass(slots=True)
class Scan:
    """Users read from Redis sets a chunk at a time (SSCAN, ZSCAN), one set after another,
    so placing the members of a set of millions never holds more than a chunk of ids.
    Like any scan it may return a user twice: placing one twice changes nothing."""

    sets: list[Scanner]  # yet to be read, the cursor in the first
    cursor: int = 0

    def __bool__(self) -> bool:
        return bool(self.sets)

    def next_chunk(self) -> list[str]:
        """About `PLACE_CHUNK` users (a scan's count is a hint), maybe none."""
        self.cursor, chunk = self.sets[0](self.cursor, PLACE_CHUNK)
        if self.cursor == 0:
            self.sets.pop(0)
        return chunk


@dataclass(slots=True)
class Sweep:
    """Placing afresh, once the model has settled, the users of the partitions that no
    worker has swept for this settling time (`Worker._watch_settling`)."""

    settled_at: int
    partitions: set[tuple[str, int]]
    members: Scan  # of the live segments
    landed: bool = True  # no chunk's write refused so far


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Records of a batch (or a run): applied, dead-lettered, skipped by a fence."""

    applied: int = 0
    invalid: int = 0
    skipped: int = 0

    def __add__(self, other: BatchStats) -> BatchStats:
        return BatchStats(
            self.applied + other.applied, self.invalid + other.invalid, self.skipped + other.skipped
        )


@contextlib.contextmanager
def settled_gc() -> Iterator[None]:
    """CPython's cycle collector tuned for a worker process, restored on exit.

    The imports (River, scikit-learn, SciPy, pydantic) leave about 150k objects that a full
    collection walks every time: in a profile of 100k events, 16 full collections took
    about 120 ms each, 15 % of the run. Frozen, they are never walked again. Each batch also
    allocates tens of thousands of short-lived objects: with a young generation of 10,000
    instead of 700, they die before they are promoted, so full collections become rare."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


class Worker:
    """One segment worker: a member of the consumer group, writing to Redis."""

    def __init__(self, settings: Settings, metrics: Metrics, stop: threading.Event) -> None:
        self.settings = settings
        self.metrics = metrics
        self.stop = stop
        backoff = Backoff(settings.worker.retry_initial_s, settings.worker.retry_max_s, stop)
        self.store = RedisStore(connect(settings.redis), settings.redis, metrics, backoff)
        self.outbox = KafkaOutbox(settings.kafka, metrics, backoff)
        self.source = KafkaSource(
            settings.kafka,
            metrics,
            backoff,
            self.store.applied_offsets,
            self._forget_partitions,
            on_assigned=self._on_assigned,
        )
        self.decode = Decoder(settings.decode.max_event_bytes)
        for reason in REASONS:  # every reason exported at 0 from the start
            metrics.invalid.labels(reason)
        for reason in ("replay", "duplicate_event_id"):
            metrics.skipped.labels(reason)
        for operation in ("connect", "poll", "commit", "produce"):
            metrics.kafka_errors.labels(operation)
        self.updater = ProfileUpdater(settings.profile)
        self.features = FeatureExtractor(settings.profile)
        self.learning = LearningWindows(
            settings.model.learn_window_minutes, settings.model.learn_window_users, self.features
        )
        self.cache = ProfileCache(settings.profile.cache_size)
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.coordinator = ModelCoordinator(settings.model, self.store, metrics, self.worker_id)
        self._pending_check = False
        # The settling time a sweep was last planned for (0: not for these partitions
        # yet), and the sweep under way.
        self._sweep_for = 0
        self._sweep: Sweep | None = None
        # Per owned partition, the offset Redis holds as this worker last wrote or read it.
        self._expected: dict[tuple[str, int], int | None] = {}
        self.report_drift = DriftReport(metrics)
        self._in_event_time = InEventTime()  # the `events` detector's view, in event time
        self.health = HealthServer(
            metrics, self.why_not_ready, settings.metrics.host, settings.metrics.port
        )
        self._last_sync = time.monotonic()
        self._sync_now = False  # the trainer's model changed: publish it now
        self._adopt_now = False  # a write found a newer publication: adopt it now
        self._described = (0, 0)  # the model (version, revision) whose segments Redis describes
        self.totals = BatchStats()

    # -- lifecycle ---------------------------------------------------------------

    def why_not_ready(self) -> str | None:
        if not self.store.healthy:
            return "Redis is not reachable"
        if not self.source.assignment:
            return "no partitions assigned"
        return None

    def run(self, stop_after_idle: float | None = None) -> None:
        """Serve until `stop` is set (SIGTERM) or, with `stop_after_idle`, until no
        event arrived for that many seconds and everything is written and committed."""
        kafka, redis_url = self.settings.kafka, self.settings.redis.url
        log.info(
            "segment-worker starting: group %s on %s (topics %s), Redis at %s, metrics on "
            "http://%s:%d/metrics",
            kafka.group_id,
            kafka.bootstrap_servers,
            ", ".join(kafka.input_topics),
            redis_url.rpartition("@")[2],
            self.settings.metrics.host,
            self.health.port,
        )
        self.health.start()
        try:
            self.store.ping()
            self.sync()
            self.source.connect()
            last_event = time.monotonic()
            while not self.stop.is_set():
                records = self.source.poll()
                # idle counts once we may consume and no user waits to be placed afresh
                if records or self._sweep is not None or not self.source.assignment:
                    last_event = time.monotonic()
                if records:
                    self.totals += self.process(records)
                else:
                    self._learn(len(self.learning))  # idle: nothing waits on learning now
                    self._observe([])  # the events held for the detector, once fetched past
                    idle = time.monotonic() - last_event
                    if stop_after_idle is not None and idle > stop_after_idle:
                        log.info("no new event for %.0fs; stopping", stop_after_idle)
                        break
                self._housekeeping()
            self.sync()
            self.coordinator.release()
        except Stopped as stopped:
            log.warning("stopped while waiting for %s; uncommitted work will be replayed", stopped)
        finally:
            self.close()

    def close(self) -> None:
        self.source.close()
        self.outbox.close()
        self.health.stop()
        t = self.totals
        log.info(
            "worker stopped: %d events applied, %d dead-lettered, %d skipped as already applied",
            t.applied,
            t.invalid,
            t.skipped,
        )

    @property
    def model(self) -> SegmentModel:
        """The published model every worker assigns with."""
        return self.coordinator.model

    def _housekeeping(self) -> None:
        self.source.update_lag()
        self.metrics.profiles_active.set(len(self.cache))
        self._watch_settling()
        if self._sync_due():
            self.sync()
        elif self._adopt_now or (self._pending_check and self.model.ready):
            self.sync(publish=False)
        elif self._sweep is not None:
            self._sweep_chunk(self._sweep)

    def _sync_due(self) -> bool:
        """Every checkpoint interval; every second while waiting for a first model; and
        when the trainer has learned `publish_every_hours` of event time past its last
        publication, once the model has settled. A worker catching up on a backlog (or a
        backfill, or the evaluation) reads days of event time in one interval, and every
        worker would assign with a model that many days behind the trained one (README,
        *Each drift alone*). Before the model settles, users are placed afresh when it
        does, whatever model placed them."""
        settings = self.settings.model
        interval = settings.checkpoint_interval_s
        if not self.model.ready:
            interval = min(interval, 1.0)
        trainer = self.coordinator.trainer
        learned = trainer.learned_to - self.model.learned_to if trainer and trainer.settled else 0
        return (
            time.monotonic() - self._last_sync >= interval
            or learned >= settings.publish_every_hours * HOUR_MS
        )

    def sync(self, publish: bool = True) -> None:
        """Share the model through Redis (see coordination.py) and write what that settles:
        the first segments of users who waited for a model, pruned memberships."""
        batch = BatchWrite()
        self._sync(batch, publish)
        self.outbox.flush()
        if batch:
            self._write(batch)
        self._place_waiting()
        if self.coordinator.leading and self.model.ready:
            self.store.expire_members(self.model.ids_ever())

    def _sync(self, batch: BatchWrite, publish: bool = True) -> None:
        if publish:
            self._last_sync, self._sync_now = time.monotonic(), False
        self._adopt_now = False
        before = {seg.id for seg in self.model.segments.values()}
        if self.coordinator.sync(publish):
            self._pending_check = True
            for segment in before - {seg.id for seg in self.model.segments.values()}:
                for gauge in (self.metrics.segment_users, self.metrics.segment_share):
                    gauge.remove(segment)
        for record in self.coordinator.take_lifecycle():
            self.outbox.lifecycle(record)
        if batch.pending and self.model.ready:  # this batch's own users who waited
            self._place(batch, batch.pending, "model")
            batch.pending = set()

    def _on_assigned(self, applied: dict[tuple[str, int], int | None]) -> None:
        """New partitions: remember what Redis holds for them, and look for users their
        previous owner left waiting for a model."""
        self._expected.update(applied)
        self._pending_check = True
        self._sweep_for = 0  # the new partitions may be due a sweep
        # Whatever the cache holds of these partitions predates their previous owner's
        # writes: read them afresh from Redis.
        self.cache.drop_partitions(set(applied))

    def _place_waiting(self) -> None:
        """Segments for waiting users on partitions this worker owns: first segments of
        users who came before any model (`seg:pending`), and new ones for the members of
        segments the latest model retired or merged away. A cold start on a backlog can
        leave hundreds of thousands waiting, and a retired segment may have had millions
        of members, so they are read and placed a chunk at a time (`Scan`), each chunk a
        write of its own. A refused write (another worker owns some of these partitions
        now) ends it: the rebalance under way looks again (`_on_assigned`)."""
        if not (self._pending_check and self.model.ready):
            return
        self._pending_check = False
        live = {seg.id for seg in self.model.segments.values()}
        gone = sorted(self.model.ids_ever() - live)
        waiting = Scan([self.store.scan_pending, *self._scan_members(gone)])
        read = 0
        while waiting:
            chunk = set(waiting.next_chunk())
            read += len(chunk)
            if chunk and not self._place_apart(chunk, "model"):
                return
        if read:
            log.info("%d users waited for a model or lost their segment: placed ours", read)

    def _scan_members(self, segments: Iterable[str]) -> list[Scanner]:
        return [partial(self.store.scan_members, segment) for segment in segments]

    def _watch_settling(self) -> None:
        """Once the published model has settled (learned past its settling time), place
        afresh every segmented user of this worker's partitions that no worker has swept
        for it yet (`_sweep_chunk`, marks in `seg:swept`). While the model settles, refits
        may redraw what the ids mean, and users follow the nearest centre only at their own
        events: a quiet one may hold an id that meant something else when they were
        placed. From then on the margin holds users where they are, and would hold them
        there. Not as soon as the stream passes the settling time: on a backlog the model
        published then can be days of event time older than the trained one, from before
        it settled, and the sweep would place everyone with it."""
        model = self.model
        if not model.settled or self._sweep_for == int(model.settled_at):
            return
        self._sweep_for = int(model.settled_at)
        owned = {(tp.topic, tp.partition) for tp in self.source.assignment}
        unswept = owned - self.store.swept(owned, self._sweep_for)
        self._sweep = None
        if unswept:
            live = sorted(seg.id for seg in model.segments.values())
            self._sweep = Sweep(self._sweep_for, unswept, Scan(self._scan_members(live)))
            log.info(
                "the model has settled: placing afresh the users of %d partitions", len(unswept)
            )

    def _sweep_chunk(self, sweep: Sweep) -> None:
        """Place the sweep's next chunk afresh (a scan, so a sweep never holds more than a
        chunk of users), in a write of its own; mark the partitions swept once all of it
        landed. Users the scan returns twice are placed twice: the second time changes
        nothing."""
        if not self._place_apart(set(sweep.members.next_chunk()), "settled", sweep.partitions):
            sweep.landed = False  # another worker owns some of them now
        if not sweep.members:
            self._sweep = None
            if sweep.landed:
                owned = {(tp.topic, tp.partition) for tp in self.source.assignment}
                self.store.mark_swept(sweep.partitions & owned, sweep.settled_at)
                log.info("users of %d partitions placed afresh", len(sweep.partitions & owned))

    def _place_apart(
        self, users: set[str], cause: str, within: set[tuple[str, int]] | None = None
    ) -> bool:
        """`_place` these users in a write of their own, outside any poll batch; whether
        it landed (False: refused, another worker owns some of them now)."""
        batch = BatchWrite()
        self._place(batch, users, cause, within)
        self.outbox.flush()
        landed = not batch or self._write(batch) is not None
        self.cache.trim()
        return landed

    def _place(
        self,
        batch: BatchWrite,
        waiting: set[str],
        cause: str,
        within: set[tuple[str, int]] | None = None,
    ) -> None:
        """Segment those of these users whose partitions this worker owns (and are
        `within` these, when given); `cause` labels the changes it makes."""
        self._load_missing(waiting)
        owned = {(tp.topic, tp.partition) for tp in self.source.assignment}
        targets = owned if within is None else owned & within
        mine: dict[str, Profile] = {}
        for user_id in sorted(waiting):
            profile = self.cache.get(user_id)
            if profile is None:  # deleted or expired meanwhile
                batch.assigned_pending.add(user_id)
            elif profile.owned_by(targets):
                mine[user_id] = profile
            elif not profile.owned_by(owned):  # another worker's: a copy would go stale
                self.cache.discard([user_id])
        if mine:
            self._assign_all(batch, mine, [self.features(p) for p in mine.values()], cause)
            batch.assigned_pending.update(mine)

    def _forget_partitions(self, partitions: set[tuple[str, int]]) -> None:
        self.learning.forget_partitions(partitions)
        for tp in partitions:
            self._expected.pop(tp, None)
        dropped = self.cache.drop_partitions(partitions)
        log.info("dropped %d cached profiles of revoked partitions", dropped)

    # -- the per-batch path ------------------------------------------------------

    def process(self, records: list[Record]) -> BatchStats:
        started = time.monotonic()
        decoded = [self.decode(r.key, r.value, r.position) for r in records]
        self._load_missing(d.event.user_id for d in decoded if isinstance(d, Decoded))
        batch = BatchWrite()
        applied: list[tuple[float, ClickEvent | PurchaseEvent]] = []
        for record, item in zip(records, decoded, strict=True):
            position = item.position
            batch.offsets[(position.topic, position.partition)] = position.offset
            batch.first_offsets.setdefault((position.topic, position.partition), position.offset)
            if isinstance(item, DeadLetter):
                self.outbox.dead_letter(item)
                batch.tally[("invalid", item.reason)] += 1
            elif isinstance(item.event, UserDeleted):
                self._delete_user(batch, item.event, position.topic)
            elif self._apply(batch, item):
                applied.append((record.appended_at, item.event))
        self._observe(applied)
        self._segment(batch, len(applied))
        if self._sync_now or (batch.pending and self._sync_due()):
            self._sync(batch)  # a model to publish or to wait for: assign waiting users now
        self.outbox.flush()
        sizes = self._write(batch)
        if sizes is None:
            return BatchStats()  # re-read here if still ours, else by the partitions' owner
        self.source.commit(batch.offsets)
        self._count(batch)
        self.cache.trim()
        written = time.time()
        for record in records:
            self.metrics.latency.observe(max(written - record.appended_at, 0.0))
        stored = sum(sizes.values())
        for segment, size in sizes.items():
            self.metrics.segment_users.labels(segment).set(size)
            self.metrics.segment_share.labels(segment).set(size / stored if stored else 0.0)
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        invalid, skipped = batch.total("invalid"), batch.total("skipped")
        return BatchStats(len(records) - invalid - skipped, invalid, skipped)

    def _count(self, batch: BatchWrite) -> None:
        """Count a batch's records once it is written: a discarded batch counts nothing."""
        counters = {
            "events": self.metrics.events,
            "invalid": self.metrics.invalid,
            "skipped": self.metrics.skipped,
        }
        for (kind, *labels), n in batch.tally.items():
            counters[kind].labels(*labels).inc(n)

    def _write(self, batch: BatchWrite) -> dict[str, int] | None:
        """Write a batch fenced by the offsets this worker expects; the size of every live
        segment, or None if refused. A newer model published meanwhile is adopted after
        the batch: the trainer publishes each new segment at once, and a worker that
        waited for its own sync interval (30 s) would go on placing users without it."""
        batch.expected = dict(self._expected)
        model = self.model
        live = [seg.id for seg in model.segments.values()] if model.ready else []
        fresh = model.ready and self._described != (model.version, model.revision)
        try:
            written = self.store.write(
                batch, live, self._snapshots() if fresh else [], model.version
            )
        except StaleBatch as stale:
            self._discard(batch, stale)
            return None
        self._expected.update(batch.offsets)
        if fresh:
            self._described = (model.version, model.revision)
        self._adopt_now = self.coordinator.behind(written.model_revision)
        return written.sizes

    def _discard(self, batch: BatchWrite, stale: StaleBatch) -> None:
        """Another worker has written partitions this one thought it owned: write nothing,
        forget what the batch touched and those partitions' profiles, and re-read from
        what Redis has applied (the coming rebalance will take the lost partitions)."""
        log.warning("batch discarded: another worker has written %s; re-reading from Redis", stale)
        self.metrics.stale_batches.inc()
        self._expected.update(stale.applied)
        self.cache.discard([*batch.profiles, *batch.segments, *batch.deleted])
        self.cache.drop_partitions(set(stale.applied))
        self.source.rewind(
            self.store.applied_offsets(list(batch.first_offsets)), batch.first_offsets
        )

    def _load_missing(self, user_ids: Iterable[str]) -> None:
        missing = list({uid for uid in user_ids if uid not in self.cache})
        for profile in self.store.load_profiles(missing).values():
            self.cache.put(profile)

    def _apply(self, batch: BatchWrite, item: Decoded) -> bool:
        """Fold one event into its user's profile, unless it is already applied (fence)
        or a repeat of a recent event id; whether it was folded."""
        event = item.event
        assert not isinstance(event, UserDeleted)
        profile = self.cache.get(event.user_id) or Profile(event.user_id)
        if profile.applied(item.position):
            batch.tally[("skipped", "replay")] += 1
            return False
        self.learning.before_fold(profile, event.timestamp)
        if not self.updater.apply(profile, event, item.position):
            batch.tally[("skipped", "duplicate_event_id")] += 1
            return False
        self.learning.after_fold(
            profile, event.timestamp, (item.position.topic, item.position.partition)
        )
        self.cache.put(profile)
        batch.profiles[profile.user_id] = profile
        batch.tally[("events", item.position.topic, event.event_type)] += 1
        return True

    def _observe(self, applied: list[tuple[float, ClickEvent | PurchaseEvent]]) -> None:
        """Show applied events (with their records' Kafka timestamps) to the `events`
        detector in event time. A fetch returns a run of one partition before the next,
        and a partition may run behind the others, so in applied order an abrupt change
        (a sale) is smeared, and a late partition's events come in lumps; held until no
        earlier one can come (`InEventTime`) and sorted, the mix is as the shop made it."""
        for event in self._in_event_time(applied, self.source.fetched_to()):
            drifted = self.coordinator.observe(event)
            if drifted is not None:
                self.report_drift("events", drifted, event.timestamp)

    def _segment(self, batch: BatchWrite, events: int) -> None:
        """Learn from the profiles that became final for their window (`learning.py`), then
        re-segment every user whose profile the batch changed, from their latest profile,
        in one vectorized pass."""
        if not batch.profiles:
            return
        self._learn(events)
        if not self.model.ready:
            batch.pending.update(batch.profiles)
            return
        features = [self.features(profile) for profile in batch.profiles.values()]
        self._assign_all(batch, batch.profiles, features, "event")

    def _learn(self, budget: int) -> None:
        """Learn from at most `budget` profiles that became final: a batch learns no more
        than its events (each profile learned took one at least), so a busy window's
        learning is spread over batches; an idle worker learns whatever waits. A worker
        that does not train hands them to the one that does (`coordination.py`)."""
        for event_ts, learned in self.coordinator.learn(self.learning.take(budget)):
            if learned.seeded or learned.adapted:
                self._sync_now = True  # publish the new segments now, not at the next interval
            for detector in learned.drifts:
                self.report_drift(detector, learned.detail, event_ts)

    def _assign_all(
        self,
        batch: BatchWrite,
        profiles: dict[str, Profile],
        xs: list[dict[str, float]],
        cause: str,
    ) -> None:
        """Segment these users in one pass of the published model; `xs` are their
        profiles' features, in the same order; `cause` labels the changes."""
        assignments = self.model.assign_many(
            xs, [p.segment for p in profiles.values()], [p.last_ts for p in profiles.values()]
        )
        for user_id, assignment in zip(list(profiles), assignments, strict=True):
            self._assign(batch, user_id, assignment, cause)  # may write batch.profiles: a copy

    def _assign(self, batch: BatchWrite, user_id: str, assignment: Assignment, cause: str) -> None:
        profile = self.cache.get(user_id)
        if profile is None:  # a warm-up user evicted since; its profile is in Redis
            self._load_missing([user_id])
            profile = self.cache.get(user_id)
            if profile is None:
                return  # deleted meanwhile
        self.metrics.distance.observe(assignment.distance)
        if profile.segment != assignment.segment:
            self.outbox.segment_change(
                SegmentChange(
                    user_id=user_id,
                    from_=profile.segment,
                    to=assignment.segment,
                    model_version=self.model.version,
                    timestamp=profile.last_ts,
                )
            )
            self.metrics.segment_changes.labels(cause).inc()
            if profile.segment is not None:
                batch.moved_from.setdefault(user_id, profile.segment)
            profile.segment = assignment.segment
        batch.profiles[user_id] = profile
        batch.segments[user_id] = UserSegment(
            segment=assignment.segment,
            segment_name=assignment.name,
            model_version=self.model.version,
            distance=round(assignment.distance, 4),
            updated_at=profile.last_ts,
        )

    def _delete_user(self, batch: BatchWrite, event: UserDeleted, topic: str) -> None:
        profile = self.cache.get(event.user_id)
        self.cache.discard([event.user_id])
        self.coordinator.forget(event.user_id)
        self.learning.forget(event.user_id)
        segment = profile.segment if profile else None
        batch.delete(event.user_id, segment)
        if segment is not None:
            self.outbox.segment_change(
                SegmentChange(
                    user_id=event.user_id,
                    from_=segment,
                    to=None,
                    model_version=self.model.version,
                    timestamp=event.timestamp,
                )
            )
        self.metrics.users_deleted.inc()
        batch.tally[("events", topic, event.event_type)] += 1

    def _snapshots(self) -> list[SegmentSnapshot]:
        if not self.model.ready:
            return []
        return [
            SegmentSnapshot(
                seg.id, seg.name, seg.description, self.model.centroid(index), seg.created_at
            )
            for index, seg in self.model.segments.items()
        ]
