"""Redis going away mid-stream: the worker pauses, says so on /readyz, and loses nothing.

The suite holds Redis down for 3 s; OUTAGE_SECONDS=20 (`make outage`) for the full version.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

import pytest
import redis
from conftest import applied, differing, profiles, wait_for

from config.settings import Settings
from worker.embedded import EmbeddedRedis
from worker.generator import generate
from worker.replay import produce
from worker.sink import RedisStore
from worker.source import ensure_topics

pytestmark = pytest.mark.integration
OUTAGE_SECONDS = float(os.environ.get("OUTAGE_SECONDS", "3"))


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
            return True
    except urllib.error.HTTPError:
        return False


def with_redis(settings: Settings, url: str, prefix: str, group: str) -> Settings:
    return settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"url": url, "key_prefix": prefix}),
            "kafka": settings.kafka.model_copy(update={"group_id": group, "max_poll_records": 300}),
        }
    )


def test_redis_outage_pauses_then_resumes_exactly(settings: Settings, start_worker) -> None:  # type: ignore[no-untyped-def]
    ensure_topics(settings.kafka, partitions=3)
    shop = generate(users=400, events=8000, seed=51)
    produce(shop.events, settings)
    with EmbeddedRedis(persistent=True) as server:
        client = redis.Redis.from_url(server.url)
        start_worker(with_redis(settings, server.url, "ref", "reference")).join()

        running = start_worker(with_redis(settings, server.url, "seg", "outage"), idle=None)
        port, registry = running.worker.health.port, running.worker.metrics.registry
        wait_for(lambda: applied(client, "seg") > 2000, timeout=120, what="progress")
        server.stop()
        down_at = time.monotonic()
        wait_for(lambda: not ready(port), what="/readyz to report the outage")

        def redis_errors() -> float:  # whichever call met the outage: read or write
            return sum(
                registry.get_sample_value("segmentation_redis_errors_total", {"operation": op}) or 0
                for op in RedisStore.OPERATIONS
            )

        wait_for(lambda: redis_errors() >= 3, what="the worker to retry Redis")
        # the outage itself is the scenario: hold Redis down for the stated time
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        assert running.thread.is_alive() and not ready(port)
        server.start()
        wait_for(lambda: ready(port), timeout=60, what="/readyz to recover")
        wait_for(
            lambda: applied(client, "seg") == len(shop.events),
            timeout=120,
            what="every event applied after the outage",
        )
        running.stop.set()
        running.join()

        users = set(shop.truth)
        expected, got = profiles(client, "ref", users), profiles(client, "seg", users)
        assert set(got) == users
        assert not differing(expected, got)
