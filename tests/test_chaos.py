"""Chaos: SIGKILL the worker at random moments; the state must be exactly what it would be.

The suite runs a short version (10k events); `make chaos` runs the full one (50k events,
CHAOS_EVENTS=50000). A reference worker consumes the same topics uninterrupted into its
own key prefix; the killed-and-restarted worker must end with the same profiles, field for
field, and one membership per user.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis
from conftest import applied, differing, profiles, wait_for, worker_env

from config.settings import Settings
from schemas.records import RedisKeys
from worker.generator import generate
from worker.replay import produce
from worker.source import ensure_topics

pytestmark = pytest.mark.integration
EVENTS = int(os.environ.get("CHAOS_EVENTS", "10000"))
KILLS = 3


def chaos_env(settings: Settings, prefix: str, group: str) -> dict[str, str]:
    return worker_env(
        settings,
        SEGMENT_REDIS_KEY_PREFIX=prefix,
        SEGMENT_KAFKA_GROUP_ID=group,
        SEGMENT_KAFKA_MAX_POLL_RECORDS="500",
        SEGMENT_MODEL_CHECKPOINT_INTERVAL_S="1",
    )


def test_sigkill_at_random_moments_changes_nothing(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    ensure_topics(settings.kafka, partitions=3)
    shop = generate(users=max(EVENTS // 10, 100), events=EVENTS, seed=41)
    produce(shop.events, settings)
    command = [sys.executable, "-m", "worker", "run"]

    reference = subprocess.run(
        [*command, "--stop-after-idle", "3"],
        env=chaos_env(settings, "ref", "reference"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert applied(redis_client, "ref") == EVENTS

    rng = random.Random(7)
    moments = sorted(rng.uniform(0.1, 0.8) * EVENTS for _ in range(KILLS))
    env = chaos_env(settings, "seg", "chaos")
    log = (tmp_path / "chaos.log").open("w")
    for moment in moments:
        worker = subprocess.Popen(command, env=env, stderr=log, stdout=subprocess.DEVNULL)
        try:
            wait_for(
                lambda m=moment: applied(redis_client, "seg") >= m,
                timeout=300,
                what=f"progress past {moment:.0f} records",
            )
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        assert applied(redis_client, "seg") < EVENTS, "killed too late to prove anything"
    final = subprocess.run(
        [*command, "--stop-after-idle", "3"],
        env=env,
        stderr=log,
        stdout=subprocess.DEVNULL,
        timeout=900,
    )
    assert final.returncode == 0

    users = set(shop.truth)
    expected, got = profiles(redis_client, "ref", users), profiles(redis_client, "seg", users)
    assert set(got) == users
    mismatched = differing(expected, got)
    assert not mismatched, f"{len(mismatched)} profiles differ, e.g. {mismatched[:3]}"
    orders = Counter(str(e["user_id"]) for e in shop.events if e["event_type"] == "purchase")
    assert all(got[u]["orders"] == orders.get(u, 0) for u in users)

    # every user is a member of exactly the segment their seg:user hash names
    keys = RedisKeys("seg")
    members: Counter[str] = Counter()
    for segment in redis_client.smembers(keys.segments):
        for user, _ in redis_client.zscan_iter(keys.members(segment.decode())):
            members[user.decode()] += 1
            assert redis_client.hget(keys.user(user.decode()), "segment") == segment
    assert set(members) == users and set(members.values()) == {1}
