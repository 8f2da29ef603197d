"""Soak: a steady stream of ever-new shoppers; the worker's memory must stop growing once
its profile cache is full, and every event must still be applied exactly once.

The suite runs 30 s at 1,000 events/s with a 5,000-profile cache; `make soak` runs the
full one (SOAK_SECONDS=600, SOAK_RATE=2000, SOAK_CACHE=200000: about a million distinct
users) and prints the figures the README quotes. The producer sends a second's events
at a time: the embedded broker's fetches slow down with the number of record batches a
partition holds. Bursts of 100, 20 a second, would leave about 12,000 in each by the end
of a full soak (counted from the pacing, not read from the broker), and the broker, not
the worker, fell behind (see the README's soak row).
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import applied, wait_for, worker_env

from config.settings import Settings
from worker.bench import scrape, total
from worker.embedded import free_port
from worker.replay import produce
from worker.source import ensure_topics

pytestmark = pytest.mark.integration
SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
RATE = float(os.environ.get("SOAK_RATE", "1000"))
CACHE = int(os.environ.get("SOAK_CACHE", "5000"))
CLICKS = ("page_view", "product_view", "search", "add_to_cart")


def endless_shoppers(start_ms: int) -> Iterator[dict[str, object]]:
    """Five of every six events come from a shopper never seen before; the sixth is an
    order by the shopper three events back, so profiles are read back from Redis too."""
    rng = random.Random(5)
    for n in itertools.count():
        user, ts = f"soak-{n - 3 if n % 6 == 5 else n}", start_ms + n * 50
        if n % 6 == 5:
            price = round(rng.uniform(5, 300), 2)
            yield {
                "event_id": f"e{n}",
                "event_type": "purchase",
                "user_id": user,
                "timestamp": ts,
                "order_id": f"o{n}",
                "total": price,
                "items": [{"product_id": f"p{n % 997}", "unit_price": price, "category": "c"}],
            }
        else:
            yield {
                "event_id": f"e{n}",
                "event_type": CLICKS[n % 4],
                "user_id": user,
                "timestamp": ts,
                "session_id": f"s{n}",
                "category": f"c{n % 13}",
                "price": round(rng.uniform(5, 300), 2),
            }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def cached_profiles(port: int) -> float:
    """The worker's `segmentation_profiles_active` gauge."""
    return total(scrape(port), "segmentation_profiles_active")


def test_memory_stops_growing_once_the_cache_is_full(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    ensure_topics(settings.kafka, partitions=2)
    port = free_port()
    env = worker_env(
        settings, SEGMENT_PROFILE_CACHE_SIZE=str(CACHE), SEGMENT_METRICS_PORT=str(port)
    )
    log = (tmp_path / "soak.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, stderr=log)
    stop = threading.Event()
    sent: list[int] = []
    producer = threading.Thread(
        target=lambda: sent.append(
            produce(
                endless_shoppers(1_790_000_000_000),
                settings,
                rate=RATE,
                stop=stop,
                burst=int(RATE),
                linger_ms=200,
            )
        ),
        daemon=True,
    )
    samples: list[tuple[float, float, float]] = []  # (seconds, RSS MB, profiles cached)
    try:
        wait_for(lambda: scrape(port), timeout=60, what="the worker's /metrics")
        producer.start()
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < SECONDS:
            assert worker.poll() is None, "the worker died"
            samples.append((elapsed, rss_mb(worker.pid), cached_profiles(port)))
            stop.wait(1.0)
        stop.set()
        producer.join(60)
        wait_for(
            lambda: applied(redis_client, "seg") == sent[0],
            timeout=300,
            what="every produced event applied",
        )
    finally:
        worker.terminate()
        exit_code = worker.wait(60)
    assert exit_code == 0

    full = [i for i, (_, _, cached) in enumerate(samples) if cached >= CACHE]
    assert full, f"the cache never filled: {samples[-1]}"
    warm = samples[full[0]][1]
    after = [rss for _, rss, _ in samples[full[0] :]]
    growth = max(after) - warm
    users = sent[0] - sent[0] // 6
    print(
        f"\nsoak: {SECONDS:.0f}s at {RATE:.0f} events/s, {sent[0]} events, {users} distinct "
        f"users, cache {CACHE}: RSS {samples[0][1]:.0f} MB at start, {warm:.0f} MB when the "
        f"cache filled at {samples[full[0]][0]:.0f}s, max {max(after):.0f} MB after "
        f"(+{growth:.1f} MB), {after[-1]:.0f} MB at the end; by quarter: "
        + ", ".join(f"{samples[len(samples) * q // 4 - 1][1]:.0f}" for q in range(1, 5))
        + " MB"
    )
    assert len(after) >= 5, "too little of the run after warm-up to judge"
    assert growth <= max(0.1 * warm, 20), f"RSS grew {growth:.0f} MB after the cache filled"
