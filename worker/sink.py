"""Where results go: Redis (segments, profiles, the replay fence) and Kafka (DLQ, changes).

One poll batch becomes one Redis MULTI/EXEC: the users' segments, their profiles
(each carrying its own per-user fence), segment membership and descriptions, and the
per-partition applied offsets. Either all of it lands or none of it does, so the offsets
Redis reports always describe exactly the state Redis holds. On a Redis Cluster, where
MULTI cannot span slots, the per-user fence inside each profile still makes a replay
harmless (DESIGN.md, "Delivery").

The Kafka outputs (dead letters, segment changes) are flushed before the Redis write, so
they are delivered at least once: a crash between the two re-sends them on replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
import redis
from kafka import KafkaProducer
from kafka.errors import KafkaError
from redis.exceptions import BusyLoadingError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.settings import KafkaSettings, RedisSettings
from schemas.records import KEY_FORMAT, RedisKeys, SegmentChange, UserSegment
from worker.decode import DeadLetter
from worker.metrics import Metrics
from worker.profiles import DAY_MS, Profile
from worker.retry import Backoff
from worker.source import kafka_client_config

log = logging.getLogger(__name__)

T = TypeVar("T")
REDIS_TRANSIENT = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError)


@dataclass(slots=True)
class SegmentSnapshot:
    id: str
    name: str
    description: str
    centroid: dict[str, float]
    created_at: int


@dataclass(slots=True)
class BatchWrite:
    """Everything one poll batch changes in Redis."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    segments: dict[str, UserSegment] = field(default_factory=dict)
    moved_from: dict[str, str] = field(default_factory=dict)
    deleted: dict[str, str | None] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def delete(self, user_id: str, segment: str | None) -> None:
        """Forget the user; `segment` is their current one (maybe set in this batch).

        Deletions are written before everything else of the batch, so a user who comes
        back later in the same batch starts from nothing.
        """
        self.profiles.pop(user_id, None)
        self.segments.pop(user_id, None)
        self.deleted[user_id] = self.moved_from.pop(user_id, segment)

    def __bool__(self) -> bool:
        return bool(self.profiles or self.deleted or self.offsets)


class RedisStore:
    OPERATIONS = (
        "ping",
        "load_profiles",
        "load_offsets",
        "write",
        "expire_members",
        "checkpoint",
        "load_model",
    )

    def __init__(
        self, client: redis.Redis, settings: RedisSettings, metrics: Metrics, backoff: Backoff
    ) -> None:
        self._redis = client
        self._keys = RedisKeys(settings.key_prefix)
        self._ttl_s = int(settings.profile_ttl_days * DAY_MS / 1000)
        self._metrics = metrics
        self._backoff = backoff
        self.healthy = False
        for operation in self.OPERATIONS:  # exported at 0 from the start, for dashboards
            metrics.redis_errors.labels(operation)

    @property
    def keys(self) -> RedisKeys:
        return self._keys

    def _call(self, operation: str, action: Callable[[], T]) -> T:
        def failed(exc: BaseException) -> None:
            self.healthy = False
            self._metrics.redis_errors.labels(operation).inc()

        result = self._backoff.call(
            f"Redis {operation}", action, retry_on=REDIS_TRANSIENT, on_error=failed
        )
        self.healthy = True
        return result

    def ping(self) -> None:
        """Check Redis answers, and record the key format this worker writes."""
        self._call("ping", lambda: self._redis.set(self._keys.format, KEY_FORMAT))

    def load_profiles(self, user_ids: list[str]) -> dict[str, Profile]:
        if not user_ids:
            return {}
        blobs = self._call(
            "load_profiles", lambda: self._redis.mget([self._keys.profile(uid) for uid in user_ids])
        )
        return {
            uid: Profile.decode(blob) for uid, blob in zip(user_ids, blobs, strict=True) if blob
        }

    def applied_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        if not partitions:
            return {}
        fields = [f"{topic}:{partition}" for topic, partition in partitions]
        values = self._call("load_offsets", lambda: self._redis.hmget(self._keys.offsets, fields))
        return {tp: int(v) for tp, v in zip(partitions, values, strict=True) if v is not None}

    def write(
        self, batch: BatchWrite, segments: Iterable[SegmentSnapshot], model_version: int
    ) -> dict[str, int]:
        """Apply one batch atomically; return the size of every live segment."""
        segments = list(segments)
        keys, ttl = self._keys, self._ttl_s

        def transaction() -> dict[str, int]:
            now_ms = int(time.time() * 1000)
            pipe = self._redis.pipeline(transaction=True)
            for user_id, segment in batch.deleted.items():
                pipe.delete(keys.user(user_id), keys.profile(user_id))
                if segment is not None:
                    pipe.zrem(keys.members(segment), user_id)
            for user_id, old in batch.moved_from.items():
                pipe.zrem(keys.members(old), user_id)
            for user_id, seg in batch.segments.items():
                fields: dict[str, str | int | float] = seg.model_dump()
                pipe.hset(keys.user(user_id), mapping=fields)  # type: ignore[arg-type]
                pipe.expire(keys.user(user_id), ttl)
                pipe.zadd(keys.members(seg.segment), {user_id: now_ms})
            for user_id, profile in batch.profiles.items():
                pipe.set(keys.profile(user_id), profile.encode(), ex=ttl)
            for snap in segments:
                pipe.hset(
                    keys.segment(snap.id),
                    mapping={
                        "name": snap.name,
                        "description": snap.description,
                        "centroid": orjson.dumps(snap.centroid),
                        "created_at": snap.created_at,
                        "model_version": model_version,
                    },
                )
            if segments:
                pipe.sadd(keys.segments, *(snap.id for snap in segments))
            if batch.offsets:
                pipe.hset(
                    keys.offsets,
                    mapping={
                        f"{topic}:{partition}": offset
                        for (topic, partition), offset in batch.offsets.items()
                    },
                )
            for snap in segments:
                pipe.zcard(keys.members(snap.id))
            results = pipe.execute()
            sizes = dict(
                zip((s.id for s in segments), results[len(results) - len(segments) :], strict=True)
            )
            if sizes:
                size_pipe = self._redis.pipeline(transaction=False)
                for segment_id, size in sizes.items():
                    size_pipe.hset(keys.segment(segment_id), "size", size)
                size_pipe.execute()
            return sizes

        return self._call("write", transaction)

    def expire_members(self, segment_ids: Iterable[str]) -> int:
        """Drop users whose keys expired (inactive past the TTL) from segment membership."""
        cutoff = int(time.time() * 1000) - self._ttl_s * 1000

        def expire() -> int:
            pipe = self._redis.pipeline(transaction=False)
            for segment_id in segment_ids:
                pipe.zremrangebyscore(self._keys.members(segment_id), "-inf", f"({cutoff}")
            return sum(pipe.execute())

        return self._call("expire_members", expire)

    def save_model(self, state: bytes) -> None:
        self._call("checkpoint", lambda: self._redis.set(self._keys.model, state))

    def load_model(self) -> bytes | None:
        blob = self._call("load_model", lambda: self._redis.get(self._keys.model))
        return blob.encode() if isinstance(blob, str) else blob


class KafkaOutbox:
    """Producer for the DLQ and `segment-changes`; `flush()` returns once all are acked."""

    def __init__(self, settings: KafkaSettings, metrics: Metrics, backoff: Backoff) -> None:
        self._settings = settings
        self._metrics = metrics
        self._backoff = backoff
        self._pending: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self._producer: KafkaProducer | None = None

    def dead_letter(self, letter: DeadLetter) -> None:
        pos = letter.position
        headers = [
            ("dlq.reason", letter.reason.encode()),
            ("dlq.detail", letter.detail.encode()),
            ("dlq.topic", pos.topic.encode()),
            ("dlq.partition", str(pos.partition).encode()),
            ("dlq.offset", str(pos.offset).encode()),
        ]
        self._pending.append((self._settings.dlq_topic, letter.key, letter.value, headers))

    def segment_change(self, change: SegmentChange) -> None:
        self._pending.append(
            (
                self._settings.changes_topic,
                change.user_id.encode(),
                orjson.dumps(change.model_dump(by_alias=True)),
                [],
            )
        )

    def flush(self) -> None:
        if not self._pending:
            return

        def send_all() -> None:
            producer = self._connect()
            futures = [
                producer.send(topic, key=key, value=value, headers=headers)
                for topic, key, value, headers in self._pending
            ]
            producer.flush(timeout=30)
            for future in futures:
                future.get(timeout=30)

        self._backoff.call(
            "producing to Kafka",
            send_all,
            retry_on=(KafkaError,),
            on_error=lambda _: self._metrics.kafka_errors.labels("produce").inc(),
        )
        self._pending.clear()

    def _connect(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(
                **kafka_client_config(self._settings),
                acks="all",
                linger_ms=5,
                retries=5,
                max_in_flight_requests_per_connection=1,
            )
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None
