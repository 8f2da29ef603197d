"""Wires the stages from the settings and runs the loop: poll → process → write → commit.

Per poll batch, in order:
  source (Kafka records) → decode (event or dead letter) → profile (fold, fenced)
  → features → model (assign + learn) → drift → sink (Kafka outbox, then one Redis
  transaction) → commit (Kafka offsets).
Nothing is committed before Redis holds the result, so a crash anywhere replays, and
the fences in Redis make the replay change nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
import redis

from config.settings import Settings
from schemas.events import UserDeleted
from schemas.records import SegmentChange, UserSegment
from worker.decode import REASONS, DeadLetter, Decoded, Decoder
from worker.drift import DriftMonitor
from worker.features import FeatureExtractor
from worker.health import HealthServer
from worker.metrics import Metrics
from worker.model import Assignment, SegmentModel
from worker.profiles import Profile, ProfileCache, ProfileUpdater
from worker.retry import Backoff, Stopped
from worker.sink import BatchWrite, KafkaOutbox, RedisStore, SegmentSnapshot
from worker.source import KafkaSource, Record

log = logging.getLogger(__name__)


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


class Worker:
    """One segment worker: a member of the consumer group, writing to Redis."""

    def __init__(self, settings: Settings, metrics: Metrics, stop: threading.Event) -> None:
        self.settings = settings
        self.metrics = metrics
        self.stop = stop
        backoff = Backoff(settings.worker.retry_initial_s, settings.worker.retry_max_s, stop)
        client = redis.Redis.from_url(
            settings.redis.url,
            socket_timeout=settings.redis.socket_timeout_s,
            socket_connect_timeout=settings.redis.socket_timeout_s,
        )
        self.store = RedisStore(client, settings.redis, metrics, backoff)
        self.outbox = KafkaOutbox(settings.kafka, metrics, backoff)
        self.source = KafkaSource(
            settings.kafka, metrics, backoff, self.store.applied_offsets, self._forget_partitions
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
        self.cache = ProfileCache(settings.profile.cache_size)
        self.model = SegmentModel(settings.model)
        self.drift = DriftMonitor(metrics)
        self.health = HealthServer(
            metrics, self.why_not_ready, settings.metrics.host, settings.metrics.port
        )
        self._last_checkpoint = time.monotonic()
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
            self._restore_model()
            self.source.connect()
            last_event = time.monotonic()
            while not self.stop.is_set():
                records = self.source.poll()
                if records or not self.source.assignment:  # idle counts once we may consume
                    last_event = time.monotonic()
                if records:
                    self.totals += self.process(records)
                elif (
                    stop_after_idle is not None and time.monotonic() - last_event > stop_after_idle
                ):
                    log.info("no new event for %.0fs; stopping", stop_after_idle)
                    break
                self._housekeeping()
            self.checkpoint()
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

    def _housekeeping(self) -> None:
        self.source.update_lag()
        self.metrics.profiles_active.set(len(self.cache))
        if time.monotonic() - self._last_checkpoint >= self.settings.model.checkpoint_interval_s:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Persist the model; also prune memberships of users whose keys expired."""
        self._last_checkpoint = time.monotonic()
        if not self.model.ready:
            return
        self.model.rename()  # names follow the centroids at checkpoint pace, not per batch
        self.store.save_model(orjson.dumps(self.model.to_state()))
        self.store.expire_members(seg.id for seg in self.model.segments.values())
        self.metrics.checkpoints.inc()
        log.info("model v%d checkpointed", self.model.version)

    def _restore_model(self) -> None:
        blob = self.store.load_model()
        if blob is None:
            log.info(
                "no model checkpoint in Redis; a new model warms up on the first %d users",
                self.settings.model.warmup_users,
            )
            return
        try:
            self.model = SegmentModel.from_state(self.settings.model, orjson.loads(blob))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("model checkpoint unusable (%s); starting a fresh model", exc)
            return
        self.metrics.model_version.set(self.model.version)
        log.info(
            "restored model v%d with segments %s",
            self.model.version,
            ", ".join(s.id for s in self.model.segments.values()),
        )

    def _forget_partitions(self, partitions: set[tuple[str, int]]) -> None:
        dropped = self.cache.drop_partitions(partitions)
        log.info("dropped %d cached profiles of revoked partitions", dropped)

    # -- the per-batch path ------------------------------------------------------

    def process(self, records: list[Record]) -> BatchStats:
        started = time.monotonic()
        decoded = [self.decode(r.key, r.value, r.position) for r in records]
        self._load_missing(d.event.user_id for d in decoded if isinstance(d, Decoded))
        batch = BatchWrite()
        invalid = skipped = 0
        for item in decoded:
            position = item.position
            batch.offsets[(position.topic, position.partition)] = position.offset
            if isinstance(item, DeadLetter):
                self.outbox.dead_letter(item)
                self.metrics.invalid.labels(item.reason).inc()
                invalid += 1
            elif isinstance(item.event, UserDeleted):
                self._delete_user(batch, item.event, position.topic)
            elif not self._apply(batch, item):
                skipped += 1
        self.outbox.flush()
        sizes = self.store.write(batch, self._snapshots(), self.model.version)
        self.source.commit(batch.offsets)
        self.cache.trim()
        written = time.time()
        for record in records:
            self.metrics.latency.observe(written - record.consumed_at)
        for segment, size in sizes.items():
            self.metrics.segment_users.labels(segment).set(size)
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        return BatchStats(len(records) - invalid - skipped, invalid, skipped)

    def _load_missing(self, user_ids: Iterable[str]) -> None:
        missing = list({uid for uid in user_ids if uid not in self.cache})
        for profile in self.store.load_profiles(missing).values():
            self.cache.put(profile)

    def _apply(self, batch: BatchWrite, item: Decoded) -> bool:
        """Fold one event into its user's profile and re-segment them; False if fenced."""
        event = item.event
        assert not isinstance(event, UserDeleted)
        profile = self.cache.get(event.user_id) or Profile(event.user_id)
        if profile.applied(item.position):
            self.metrics.skipped.labels("replay").inc()
            return False
        if profile.seen(event.event_id, item.position.topic):
            self.metrics.skipped.labels("duplicate_event_id").inc()
            return False
        self.updater.apply(profile, event, item.position)
        self.cache.put(profile)
        batch.profiles[profile.user_id] = profile
        self.metrics.events.labels(item.position.topic, event.event_type).inc()
        x = self.features(profile)
        for user_id, assignment in self.model.learn_assign(
            profile.user_id, x, event.timestamp
        ).items():
            self._assign(batch, user_id, assignment)
            if user_id == profile.user_id:
                self.drift.update(assignment.distance, event.timestamp)
        return True

    def _assign(self, batch: BatchWrite, user_id: str, assignment: Assignment) -> None:
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
            self.metrics.segment_changes.inc()
            if profile.segment is not None:
                batch.moved_from.setdefault(user_id, profile.segment)
            profile.segment = assignment.segment
        batch.profiles[user_id] = profile
        batch.segments[user_id] = UserSegment(
            segment=assignment.segment,
            segment_name=self.model.name_of(assignment.segment),
            model_version=self.model.version,
            distance=round(assignment.distance, 4),
            updated_at=profile.last_ts,
        )
        self.metrics.model_version.set(self.model.version)

    def _delete_user(self, batch: BatchWrite, event: UserDeleted, topic: str) -> None:
        profile = self.cache.get(event.user_id)
        self.cache.discard([event.user_id])
        self.model.forget(event.user_id)
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
        self.metrics.events.labels(topic, event.event_type).inc()

    def _snapshots(self) -> list[SegmentSnapshot]:
        if not self.model.ready:
            return []
        return [
            SegmentSnapshot(
                seg.id, seg.name, seg.description, self.model.centroid(index), seg.created_at
            )
            for index, seg in self.model.segments.items()
        ]
