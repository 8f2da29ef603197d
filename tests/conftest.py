"""Fixtures: a real Tansu broker and a real redis-server per session, isolated per test.

Each test gets its own topic names, consumer group and Redis database contents, so
tests share the servers (starting them is the slow part) but never each other's data.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import pytest
import redis

from config.settings import Settings, load_settings
from schemas.events import ClickEvent, PurchaseEvent
from schemas.records import RedisKeys
from worker.app import Worker
from worker.embedded import EmbeddedBroker, EmbeddedRedis
from worker.metrics import Metrics
from worker.profiles import Profile


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def settings(
    request: pytest.FixtureRequest,
    broker: EmbeddedBroker,
    redis_server: EmbeddedRedis,
    redis_client: redis.Redis,
) -> Settings:
    """Settings for this test: its own topics and group, short timeouts, small warm-up."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50]
    name = f"{slug}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}"  # unique
    return load_settings(
        kafka={
            "bootstrap_servers": broker.bootstrap_servers,
            "group_id": f"g-{name}",
            "clickstream_topic": f"{name}-clicks",
            "purchases_topic": f"{name}-purchases",
            "dlq_topic": f"{name}-dlq",
            "changes_topic": f"{name}-changes",
            "lifecycle_topic": f"{name}-lifecycle",
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "poll_timeout_ms": 200,
        },
        redis={"url": redis_server.url},
        model={"warmup_users": 100, "checkpoint_interval_s": 1.0},
        metrics={"host": "127.0.0.1", "port": 0},
        worker={"retry_initial_s": 0.1, "retry_max_s": 1.0},
    )


@dataclass
class RunningWorker:
    worker: Worker
    thread: threading.Thread
    stop: threading.Event
    errors: list[BaseException] = field(default_factory=list)

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def start_worker() -> Iterator[Callable[..., RunningWorker]]:
    """Start workers in threads; each stops after `idle` s without events, or at teardown."""
    started: list[RunningWorker] = []

    def start(settings: Settings, idle: float | None = 2.0) -> RunningWorker:
        stop = threading.Event()
        worker = Worker(settings, Metrics(), stop)
        running = RunningWorker(worker, threading.Thread(daemon=True), stop)

        def target() -> None:
            try:
                worker.run(stop_after_idle=idle)
            except BaseException as exc:  # surfaced by join()
                running.errors.append(exc)

        running.thread = threading.Thread(target=target, daemon=True)
        running.thread.start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop.set()
        running.thread.join(30)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `segment-worker` process with these settings (and `extra`)."""
    k = settings.kafka
    env = {name: value for name, value in os.environ.items() if not name.startswith("SEGMENT_")}
    return (
        env
        | {
            "SEGMENT_KAFKA_BOOTSTRAP_SERVERS": k.bootstrap_servers,
            "SEGMENT_KAFKA_GROUP_ID": k.group_id,
            "SEGMENT_KAFKA_CLICKSTREAM_TOPIC": k.clickstream_topic,
            "SEGMENT_KAFKA_PURCHASES_TOPIC": k.purchases_topic,
            "SEGMENT_KAFKA_DLQ_TOPIC": k.dlq_topic,
            "SEGMENT_KAFKA_CHANGES_TOPIC": k.changes_topic,
            "SEGMENT_KAFKA_LIFECYCLE_TOPIC": k.lifecycle_topic,
            "SEGMENT_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "SEGMENT_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            "SEGMENT_REDIS_URL": settings.redis.url,
            "SEGMENT_METRICS_PORT": "0",
            "SEGMENT_MODEL_WARMUP_USERS": "100",
            "SEGMENT_WORKER_RETRY_MAX_S": "1",
        }
        | extra
    )


def applied(client: redis.Redis, prefix: str) -> int:
    """Records applied so far: the sum over partitions of Redis's fence offsets + 1."""
    return sum(int(v) + 1 for v in client.hvals(RedisKeys(prefix).offsets))


def profiles(client: redis.Redis, prefix: str, users: set[str]) -> dict[str, dict[str, object]]:
    keys = RedisKeys(prefix)
    found = {}
    for user in users:
        blob = client.get(keys.profile(user))
        if blob is not None:
            profile = asdict(Profile.decode(user, blob))
            del profile["segment"]  # the model's answer, not the profile's data
            found[user] = profile
    return found


def same(expected: object, got: object) -> bool:
    """Equal field for field; floats to 1e-9 relative.

    A user's clicks and orders arrive on two topics whose interleaving differs from run to
    run; decayed sums are the same numbers added in another order, so they may differ in
    the last bits and nowhere else.
    """
    if isinstance(expected, float) or isinstance(got, float):
        return isinstance(got, int | float) and math.isclose(
            expected,
            got,
            rel_tol=1e-9,
            abs_tol=1e-12,  # type: ignore[arg-type]
        )
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(same(v, got[k]) for k, v in expected.items())
    if isinstance(expected, list) and isinstance(got, list):
        return len(expected) == len(got) and all(map(same, expected, got))
    return expected == got


def differing(
    expected: dict[str, dict[str, object]], got: dict[str, dict[str, object]]
) -> list[str]:
    """Users whose profiles are not `same` (or missing on either side)."""
    return sorted(u for u in expected.keys() | got.keys() if not same(expected.get(u), got.get(u)))


def wait_for(condition: Callable[[], object], timeout: float = 30, what: str = "condition") -> None:
    """Poll `condition` until truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def event_mix(
    rng: random.Random, purchase_share: float, n: int, start_ts: int = 0
) -> list[ClickEvent | PurchaseEvent]:
    """`n` events a second apart, of a shop whose purchases are this share of its events
    (what the `events` detector watches; the rest as in a steady shop)."""
    kinds = ["page_view", "product_view", "search", "add_to_cart", "purchase"]
    weights = [0.4, 0.35, 0.1, 0.15 - purchase_share, purchase_share]
    events: list[ClickEvent | PurchaseEvent] = []
    for i in range(n):
        kind, ts = rng.choices(kinds, weights)[0], start_ts + i * 1000
        if kind == "purchase":
            events.append(PurchaseEvent.model_construct(event_type=kind, timestamp=ts))
        else:
            price = rng.lognormvariate(4, 0.5)
            events.append(ClickEvent.model_construct(event_type=kind, price=price, timestamp=ts))
    return events
