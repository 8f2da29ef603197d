"""Where results go: Redis (segments, profiles, the replay fence) and Kafka (DLQ, changes).

One poll batch becomes one Redis MULTI/EXEC: the users' segments, their profiles
(each carrying its own per-user fence), segment membership and descriptions, and the
per-partition applied offsets. Either all of it lands or none of it does, so the offsets
Redis reports always describe exactly the state Redis holds. The transaction WATCHes the
offsets and is refused when another worker has written any partition this one owns: the
batch comes from a worker that lost its partitions in a rebalance it has not noticed yet.

A Redis Cluster runs a transaction only within one hash slot, so it is refused at start
(`RedisStore.ping`). The per-user fence inside each profile is the part of a cluster-ready
write that exists: it makes a replay harmless without the transaction (DESIGN.md, "Delivery").

The Kafka outputs (dead letters, segment changes) are flushed before the Redis write, so
they are delivered at least once: a crash between the two re-sends them on replay.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import redis
from kafka import KafkaProducer
from kafka.errors import KafkaError
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ReadOnlyError,
    ResponseError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.settings import KafkaSettings, RedisSettings
from schemas.reader import text
from schemas.records import KEY_FORMAT, RedisKeys, SegmentChange, SegmentLifecycle, UserSegment
from worker.decode import DeadLetter
from worker.drift import EventSample
from worker.learning import Learnable
from worker.metrics import Metrics
from worker.profiles import DAY_MS, Profile
from worker.retry import Backoff, Permanent
from worker.source import kafka_client_config

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLAIM_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leader = redis.call('HGET', KEYS[1], 'leader')
local lease_until = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
if leader == ARGV[1] or lease_until < now then
    redis.call('HSET', KEYS[1], 'leader', ARGV[1], 'lease_until', now + tonumber(ARGV[2]))
    return 1
end
return 0
"""
_RELEASE_LEASE = """
if redis.call('HGET', KEYS[1], 'leader') == ARGV[1] then
    redis.call('HSET', KEYS[1], 'lease_until', 0)
end
return 0
"""
_PUBLISH_MODEL = """
if redis.call('HGET', KEYS[1], 'leader') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'revision', ARGV[3])
return 1
"""
REDIS_TRANSIENT = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError)


def connect(settings: RedisSettings) -> redis.Redis:
    """A client for `redis.url`; a rediss:// one verifies the server with the CA file
    (else the system's CAs) and presents the client certificate if one is set."""
    tls: dict[str, Any] = {}
    if settings.url.startswith("rediss://"):
        files = {
            "ssl_ca_certs": settings.ssl_ca_file,
            "ssl_certfile": settings.ssl_cert_file,
            "ssl_keyfile": settings.ssl_key_file,
        }
        tls = {name: path for name, path in files.items() if path}
    return redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        **tls,
    )


def stored_profiles(client: redis.Redis, keys: RedisKeys, chunk: int = 5000) -> list[Profile]:
    """Every profile stored under these keys: a full scan, for offline jobs (the batch
    alternative of `bench`, `evaluate`), never for the worker."""
    names = [text(name) for name in client.scan_iter(keys.profile("*"), count=chunk)]
    prefix = len(keys.profile(""))
    profiles = []
    for start in range(0, len(names), chunk):
        part = names[start : start + chunk]
        stored = zip(part, client.mget(part), strict=True)
        profiles += [Profile.decode(name[prefix:], blob) for name, blob in stored if blob]
    return profiles


def delete_keys(client: redis.Redis, pattern: str, chunk: int = 5000) -> None:
    """Unlink every key matching `pattern`, a chunk at a time: what a bench or evaluation
    run stored on a Redis it was given."""
    names = list(client.scan_iter(pattern, count=chunk))
    for start in range(0, len(names), chunk):
        client.unlink(*names[start : start + chunk])


SHARED_CAP = 100_000  # entries the stream keeps when no worker trains


@dataclass(slots=True)
class Handed:
    """What a worker that does not train hands the one that does (`seg:learning`): the
    profiles it would have learned from, in the order it took them, the users deleted
    since, and the samples of its event mix for the `events` detector."""

    worker: str = ""
    learnable: list[Learnable] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    samples: list[tuple[int, EventSample]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.learnable or self.forgotten or self.samples)

    def entries(self) -> Iterator[dict[str, bytes]]:
        """As stream entries: `e` a profile (user, features, time) or a deletion (user),
        `m` a sample (time, sample); `w` the worker's id."""
        worker = self.worker.encode()
        for user_id in self.forgotten:
            yield {"e": orjson.dumps([user_id]), "w": worker}
        for learnable in self.learnable:
            yield {"e": orjson.dumps(learnable), "w": worker}
        for sample in self.samples:
            yield {"m": orjson.dumps(sample), "w": worker}

    def add(self, entry: dict[bytes, bytes]) -> None:
        """Take one stream entry back (`entries`)."""
        if b"m" in entry:
            event_ts, sample = orjson.loads(entry[b"m"])
            self.samples.append((event_ts, sample))
            return
        user_id, *learned = orjson.loads(entry[b"e"])
        if learned:
            self.learnable.append((user_id, learned[0], learned[1]))
        else:
            self.forgotten.append(user_id)


class RedisRejected(Permanent):
    """Redis refused the credentials of `redis.url`."""


class RedisClusterUnsupported(Permanent):
    """`redis.url` names a node of a Redis Cluster (see `RedisStore.ping`)."""


def _cluster_enabled(client: redis.Redis) -> bool:
    """Whether the server is a Redis Cluster node. A server that does not serve INFO
    (some managed ones restrict it) is taken at its word that it is a plain Redis: a
    cluster would still refuse the first cross-slot write."""
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except ResponseError:
        return False


class StaleBatch(Exception):
    """Another worker has written partitions this one thinks it owns (RedisStore.write)."""

    def __init__(self, applied: dict[tuple[str, int], int]) -> None:
        super().__init__(", ".join(f"{t}-{p} at {o}" for (t, p), o in applied.items()))
        self.applied = applied


@dataclass(slots=True)
class SegmentSnapshot:
    id: str
    name: str
    description: str
    centroid: dict[str, float]
    created_at: int


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch's transaction found in Redis: the size of every live segment, and
    the revision of the published model (so a worker that does not train learns of a
    new one with its next write, not at its next sync)."""

    sizes: dict[str, int]
    model_revision: int


@dataclass(slots=True)
class BatchWrite:
    """Everything one poll batch changes in Redis."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    segments: dict[str, UserSegment] = field(default_factory=dict)
    moved_from: dict[str, str] = field(default_factory=dict)
    deleted: dict[str, str | None] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    first_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    expected: dict[tuple[str, int], int | None] = field(default_factory=dict)
    tally: Counter[tuple[str, ...]] = field(default_factory=Counter)  # counted once written
    pending: set[str] = field(default_factory=set)
    assigned_pending: set[str] = field(default_factory=set)

    def delete(self, user_id: str, segment: str | None) -> None:
        """Forget the user; `segment` is their current one (maybe set in this batch).

        Deletions are written before everything else of the batch, so a user who comes
        back later in the same batch starts from nothing.
        """
        self.profiles.pop(user_id, None)
        self.segments.pop(user_id, None)
        self.pending.discard(user_id)
        self.assigned_pending.add(user_id)
        self.deleted[user_id] = self.moved_from.pop(user_id, segment)

    def total(self, kind: str) -> int:
        """Records of one kind in the tally ("events", "invalid" or "skipped")."""
        return sum(n for (k, *_), n in self.tally.items() if k == kind)

    def __bool__(self) -> bool:
        return bool(self.profiles or self.deleted or self.offsets or self.assigned_pending)


class RedisStore:
    OPERATIONS = (
        "ping",
        "load_profiles",
        "load_offsets",
        "write",
        "expire_members",
        "checkpoint",
        "load_model",
        "model_lease",
        "load_pending",
        "swept",
        "learning",
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
        # The lease, the state and its revision live in one hash (`seg:model`), so these
        # scripts touch one key and run unchanged on a Redis Cluster.
        self._claim = client.register_script(_CLAIM_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)
        self._publish = client.register_script(_PUBLISH_MODEL)
        for operation in self.OPERATIONS:  # exported at 0 from the start, for dashboards
            metrics.redis_errors.labels(operation)

    @property
    def keys(self) -> RedisKeys:
        return self._keys

    def _call(
        self,
        operation: str,
        action: Callable[[], T],
        unless: tuple[type[BaseException], ...] = (),
    ) -> T:
        def failed(exc: BaseException) -> None:
            self.healthy = False
            self._metrics.redis_errors.labels(operation).inc()

        result = self._backoff.call(
            f"Redis {operation}", action, REDIS_TRANSIENT, on_error=failed, unless=unless
        )
        self.healthy = True
        return result

    def ping(self) -> None:
        """Check Redis answers and is not a cluster node, and record the key format this
        worker writes. Refused credentials at start are a configuration error, not an
        outage to wait out (later, as during a password rotation, they are retried like
        any other failure)."""

        def check() -> None:
            if _cluster_enabled(self._redis):
                raise RedisClusterUnsupported(
                    "redis.url names a node of a Redis Cluster, which the worker cannot "
                    "write to: each poll batch is one MULTI/EXEC over many users' keys, "
                    "and a cluster runs a transaction only within one hash slot. Use a "
                    "standalone Redis or a primary with replicas (cluster mode disabled)."
                )
            self._redis.set(self._keys.format, KEY_FORMAT)

        try:
            self._call("ping", check, unless=(AuthenticationError,))
        except AuthenticationError as exc:
            raise RedisRejected(f"Redis refused the credentials in redis.url: {exc}") from None

    def load_profiles(self, user_ids: list[str]) -> dict[str, Profile]:
        if not user_ids:
            return {}
        blobs = self._call(
            "load_profiles", lambda: self._redis.mget([self._keys.profile(uid) for uid in user_ids])
        )
        stored = zip(user_ids, blobs, strict=True)
        return {uid: Profile.decode(uid, blob) for uid, blob in stored if blob}

    def applied_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        if not partitions:
            return {}
        fields = [f"{topic}:{partition}" for topic, partition in partitions]
        values = self._call("load_offsets", lambda: self._redis.hmget(self._keys.offsets, fields))
        return {tp: int(v) for tp, v in zip(partitions, values, strict=True) if v is not None}

    def swept(self, partitions: set[tuple[str, int]], settled_at: int) -> set[tuple[str, int]]:
        """Those of these partitions whose users were placed afresh when the model with
        this settling time settled."""
        ordered = sorted(partitions)
        fields = [f"{topic}:{partition}" for topic, partition in ordered]
        values = self._call(
            "swept", lambda: self._redis.hmget(self._keys.swept, fields) if fields else []
        )
        return {tp for tp, v in zip(ordered, values, strict=True) if v and int(v) == settled_at}

    def mark_swept(self, partitions: set[tuple[str, int]], settled_at: int) -> None:
        if not partitions:
            return
        self._call(
            "swept",
            lambda: self._redis.hset(
                self._keys.swept, mapping={f"{t}:{p}": settled_at for t, p in partitions}
            ),
        )

    def write(
        self,
        batch: BatchWrite,
        live: list[str],
        described: list[SegmentSnapshot],
        model_version: int,
    ) -> Written:
        """Apply one batch atomically, with the descriptions of segments that changed
        since the last write."""
        keys, ttl = self._keys, self._ttl_s

        def transaction() -> Written:
            while True:
                try:
                    return fenced_transaction()
                except WatchError:
                    continue  # another worker wrote offsets meanwhile: check again

        def fenced_transaction() -> Written:
            now_ms = int(time.time() * 1000)
            pipe = self._redis.pipeline(transaction=True)
            pipe.watch(keys.offsets)  # type: ignore[no-untyped-call]
            if batch.expected:
                self._refuse_stale(pipe, batch.expected)
            pipe.multi()
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
            for snap in described:
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
            if described:  # exactly the live ids: retired ones keep their hash, for history
                pipe.delete(keys.segments)
                pipe.sadd(keys.segments, *(snap.id for snap in described))
            if batch.pending:
                pipe.sadd(keys.pending, *batch.pending)
            if batch.assigned_pending:
                pipe.srem(keys.pending, *batch.assigned_pending)
            if batch.offsets:
                pipe.hset(
                    keys.offsets,
                    mapping={
                        f"{topic}:{partition}": offset
                        for (topic, partition), offset in batch.offsets.items()
                    },
                )
            for segment_id in live:
                pipe.zcard(keys.members(segment_id))
            pipe.hget(keys.model, "revision")
            *results, revision = pipe.execute()
            sizes = dict(zip(live, results[len(results) - len(live) :], strict=True))
            if sizes:
                size_pipe = self._redis.pipeline(transaction=False)
                for segment_id, size in sizes.items():
                    size_pipe.hset(keys.segment(segment_id), "size", size)
                size_pipe.execute()
            return Written(sizes, int(revision or 0))

        return self._call("write", transaction)

    def _refuse_stale(self, pipe: Any, expected: dict[tuple[str, int], int | None]) -> None:
        """Raise StaleBatch when Redis's applied offset of any partition this worker owns is
        not the one it last wrote: another worker has written there, so this one lost the
        partition in a rebalance it has not noticed yet and must not overwrite anything.
        All owned partitions are checked, not only the batch's: a user's clicks and orders
        come from two partitions, and a write fed by one must not undo the other's."""
        fields = [f"{topic}:{partition}" for topic, partition in expected]
        stored = pipe.hmget(self._keys.offsets, fields)
        moved = {
            tp: int(value)
            for (tp, mine), value in zip(expected.items(), stored, strict=True)
            if value is not None and int(value) != mine
        }
        if moved:
            pipe.reset()
            raise StaleBatch(moved)

    def expire_members(self, segment_ids: Iterable[str]) -> int:
        """Drop users whose keys expired (inactive past the TTL) from segment membership."""
        cutoff = int(time.time() * 1000) - self._ttl_s * 1000

        def expire() -> int:
            pipe = self._redis.pipeline(transaction=False)
            for segment_id in segment_ids:
                pipe.zremrangebyscore(self._keys.members(segment_id), "-inf", f"({cutoff}")
            return sum(pipe.execute())

        return self._call("expire_members", expire)

    def highest_segment_id(self) -> int:
        """The highest numbered segment id ever described here (`s7` -> 7), live or
        retired, so a fresh model (say after an incompatible upgrade) does not reuse one."""
        prefix = self._keys.segment("")

        def scan() -> int:
            numbers = [
                text(k)[len(prefix) + 1 :]
                for k in self._redis.scan_iter(match=self._keys.segment("*"), count=1000)
            ]
            return max((int(n) for n in numbers if n.isdigit()), default=0)

        return self._call("scan_segments", scan)

    def scan_members(self, segment_id: str, cursor: int, count: int) -> tuple[int, list[str]]:
        """About `count` members of a segment from `cursor` on, and the cursor to go on
        from (0: done). Members present throughout are returned at least once."""
        cursor, scored = self._call(
            "load_members",
            lambda: self._redis.zscan(self._keys.members(segment_id), cursor, count=count),
        )
        return int(cursor), [text(member) for member, _ in scored]

    def scan_pending(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """Users waiting for a first model, as `scan_members` reads a segment's."""
        cursor, members = self._call(
            "load_pending", lambda: self._redis.sscan(self._keys.pending, cursor, count=count)
        )
        return int(cursor), [text(member) for member in members]

    def share_learning(self, handed: Handed) -> None:
        """Append what this worker hands the training worker to the stream it reads
        (`read_shared`). At most `SHARED_CAP` entries wait: a sample more or less is
        nothing to wait for."""
        if not handed:
            return

        def append() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for entry in handed.entries():
                pipe.xadd(self._keys.learning, entry, maxlen=SHARED_CAP, approximate=True)  # type: ignore[arg-type]
            pipe.execute()

        self._call("learning", append)

    def read_shared(self, after: str, count: int) -> tuple[str, list[Handed]]:
        """Up to `count` entries shared after stream id `after`, by worker, and the id of
        the last; what was read is trimmed, so an entry lives only until the trainer has
        it."""

        def read() -> tuple[str, list[Handed]]:
            found: Any = self._redis.xread({self._keys.learning: after}, count=count)
            if not found:
                return after, []
            entries = found[0][1]  # [(id, fields)] of the one stream read
            last = text(entries[-1][0])
            self._redis.xtrim(self._keys.learning, minid=last, approximate=False)
            by_worker: dict[str, Handed] = {}
            for _, fields in entries:
                worker = text(fields.get(b"w", b""))
                by_worker.setdefault(worker, Handed(worker)).add(fields)
            return last, list(by_worker.values())

        return self._call("learning", read)

    def claim_model_lease(self, worker_id: str, ttl_ms: int) -> bool:
        """Become (or stay) the one worker that trains and publishes the model."""
        claimed = self._call(
            "model_lease", lambda: self._claim(keys=[self._keys.model], args=[worker_id, ttl_ms])
        )
        return bool(claimed)

    def release_model_lease(self, worker_id: str) -> None:
        self._call("model_lease", lambda: self._release(keys=[self._keys.model], args=[worker_id]))

    def publish_model(self, worker_id: str, state: bytes, revision: int) -> bool:
        """Publish a model state if this worker still holds the lease."""
        published = self._call(
            "checkpoint",
            lambda: self._publish(keys=[self._keys.model], args=[worker_id, state, revision]),
        )
        return bool(published)

    def load_model(self) -> tuple[int, bytes] | None:
        """The published (revision, state), or None before the first publication."""
        revision, state = self._call(
            "load_model", lambda: self._redis.hmget(self._keys.model, ["revision", "state"])
        )
        if revision is None or state is None:
            return None
        return int(revision), state.encode() if isinstance(state, str) else state


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

    def lifecycle(self, record: SegmentLifecycle) -> None:
        key = (record.segment or record.detector or "").encode()
        self._pending.append(
            (self._settings.lifecycle_topic, key, orjson.dumps(record.model_dump()), [])
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
