"""Three workers on six partitions, one killed mid-stream: one model, nothing lost or doubled."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from threading import Event
from typing import Any

import orjson
import pytest
import redis
from conftest import applied, differing, event_mix, profiles, wait_for
from test_chaos import chaos_env

from config.settings import ModelSettings, ProfileSettings, Settings
from schemas.events import ClickEvent, PurchaseEvent
from schemas.records import RedisKeys
from worker.coordination import ModelCoordinator
from worker.features import FEATURES, FeatureExtractor
from worker.generator import event_ms, generate
from worker.metrics import Metrics
from worker.model import SegmentModel
from worker.profiles import HOUR_MS, Profile
from worker.replay import produce
from worker.retry import Backoff
from worker.sink import RedisStore
from worker.source import ensure_topics

pytestmark = pytest.mark.integration
COMMAND = [sys.executable, "-m", "worker", "run", "--stop-after-idle", "15"]


def published(client: redis.Redis, prefix: str) -> dict[str, Any] | None:
    state = client.hget(RedisKeys(prefix).model, "state")
    return orjson.loads(state) if state else None


def coordinator(settings: Settings, client: redis.Redis, worker_id: str) -> ModelCoordinator:
    """A worker's model coordinator on this Redis, synced once: the first to sync holds
    the lease and trains, the others follow it."""
    store = RedisStore(client, settings.redis, Metrics(), Backoff(0.1, 1, Event()))
    synced = ModelCoordinator(settings.model, store, Metrics(), worker_id)
    synced.sync()
    return synced


def seeded_trainer(settings: Settings, client: redis.Redis) -> ModelCoordinator:
    """A coordinator holding the model lease, its model seeded and published (revision 1)
    from random profiles."""
    trainer = coordinator(settings, client, "trainer")
    rng = random.Random(3)
    warm = [{name: rng.random() for name in FEATURES} for _ in range(settings.model.warmup_users)]
    trainer.learn([(f"warm-{i}", x, i) for i, x in enumerate(warm)])
    trainer.sync()
    return trainer


def test_three_workers_one_killed_share_one_model_and_lose_nothing(
    settings: Settings, redis_client: redis.Redis
) -> None:
    ensure_topics(settings.kafka, partitions=6)
    shop = generate(users=600, events=12_000, seed=71)
    produce(shop.events, settings)
    users = set(shop.truth)

    reference = subprocess.run(
        [*COMMAND[:-1], "3"],
        env=chaos_env(settings, "ref", "reference"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    # A long publication interval and no adaptation: after seeding (revision 1) every worker
    # assigns with the same published revision for the whole run, so agreement is exact.
    env = chaos_env(settings, "seg", "group") | {
        "SEGMENT_MODEL_CHECKPOINT_INTERVAL_S": "600",
        "SEGMENT_MODEL_ADAPTATION": "false",  # segments frozen at the first revision
    }
    workers = [
        subprocess.Popen(
            COMMAND, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    first: dict[str, Any] = {}

    def seeded() -> bool:
        state = published(redis_client, "seg")
        if state is not None and not first:
            first.update(state)
        return bool(first)

    wait_for(seeded, timeout=120, what="the first published model")
    wait_for(
        lambda: applied(redis_client, "seg") > len(shop.events) // 3,
        timeout=300,
        what="a third of the stream applied",
    )
    victim = workers.pop(random.Random(5).randrange(3))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    assert applied(redis_client, "seg") == len(shop.events)

    expected, got = profiles(redis_client, "ref", users), profiles(redis_client, "seg", users)
    bad = differing(expected, got)
    assert not bad

    # every segment was assigned by the one published revision, whichever worker held the user
    assert first["revision"] == 1
    model = SegmentModel.from_state(ModelSettings(), first)
    extract, keys = FeatureExtractor(ProfileSettings()), RedisKeys("seg")
    disagreeing = []
    for user in users:
        profile = Profile.decode(user, redis_client.get(keys.profile(user)))  # type: ignore[arg-type]
        stored = (redis_client.hget(keys.user(user), "segment") or b"").decode()
        # where that revision's rule (nearest, or staying within the switch margin) keeps them
        if model.assign(extract(profile), current=stored).segment != stored:
            disagreeing.append(user)
    assert not disagreeing, f"{len(disagreeing)} users disagree, e.g. {disagreeing[:3]}"


def test_the_trainer_of_two_workers_learns_from_both_workers_shoppers(
    settings: Settings, redis_client: redis.Redis, start_worker
) -> None:  # type: ignore[no-untyped-def]
    """The worker that trains learns from the other's shoppers too, handed over through
    `seg:learning`: its model learns from as many profiles as one worker's does on the same
    shop. Learning from its own partitions only, it learned from half (README, Segments)."""
    ensure_topics(settings.kafka, partitions=4)
    shop = generate(users=400, events=8000, seed=72)
    pair = [start_worker(settings, idle=None) for _ in range(2)]
    wait_for(
        lambda: all(len(w.worker.source.assignment) == 4 for w in pair),
        timeout=120,
        what="both workers assigned",
    )
    produce(shop.events, settings)
    wait_for(lambda: applied(redis_client, "seg") == len(shop.events), timeout=300, what="all")
    follower, trainer = sorted(pair, key=lambda w: w.worker.coordinator.leading)
    follower.stop.set()  # first: what it hands over at the end, the trainer still reads
    follower.join()
    learning = RedisKeys("seg").learning
    wait_for(lambda: redis_client.xlen(learning) <= 1, timeout=60, what="the stream read, trimmed")
    trainer.stop.set()
    trainer.join()
    alone = settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"key_prefix": "alone"}),
            "kafka": settings.kafka.model_copy(update={"group_id": "alone"}),
        }
    )
    start_worker(alone).join()

    def learned(prefix: str) -> float:
        state = published(redis_client, prefix)
        assert state is not None
        return float(max(state["scaler"]["counts"].values()))  # profiles learned from

    assert learned("seg") >= 0.9 * learned("alone"), (learned("seg"), learned("alone"))


def test_a_user_deleted_on_another_worker_leaves_the_trainers_reservoir(
    settings: Settings, redis_client: redis.Redis
) -> None:
    trainer = coordinator(settings, redis_client, "trainer")
    follower = coordinator(settings, redis_client, "follower")
    assert trainer.leading and not follower.leading
    x = {name: 1.0 for name in FEATURES}
    follower.learn([("kept", x, 1), ("deleted", x, 2)])
    follower.forget("deleted")
    follower.learn([])  # hands the deletion over
    trainer.learn([])
    assert trainer.trainer is not None
    assert set(trainer.trainer.reservoir) == {"kept"}


def test_a_follower_adopts_a_new_publication_with_its_next_write(
    settings: Settings, redis_client: redis.Redis, start_worker
) -> None:  # type: ignore[no-untyped-def]
    """A worker that does not train adopts each model the trainer publishes with its next
    write, not at its own sync a checkpoint interval later: the trainer publishes a new
    segment at once, and with a 30 s interval a follower went on placing its half of the
    shop without it (README, Evaluation, `--workers N`)."""
    slow = settings.model_copy(
        update={"model": settings.model.model_copy(update={"checkpoint_interval_s": 600.0})}
    )
    trainer = seeded_trainer(slow, redis_client)  # the lease for half an hour: the worker follows
    assert trainer.model.revision == 1
    ensure_topics(slow.kafka, partitions=2)
    shop = generate(users=200, events=2000, seed=73)
    follower = start_worker(slow, idle=None)
    produce(shop.events[:1000], slow)
    wait_for(lambda: applied(redis_client, "seg") == 1000, timeout=120, what="the first half")
    assert not follower.worker.coordinator.leading
    assert follower.worker.model.revision == 1

    trainer.sync()  # revision 2, as when the trainer adds a segment
    produce(shop.events[1000:], slow)
    wait_for(lambda: applied(redis_client, "seg") == 2000, timeout=120, what="the second half")
    # adopted after the write that found it (600 s before the worker's own sync)
    wait_for(lambda: follower.worker.model.revision == 2, timeout=20, what="revision 2 adopted")


def test_the_trainer_publishes_as_it_learns_event_time_not_only_by_the_clock(
    settings: Settings, redis_client: redis.Redis, start_worker
) -> None:  # type: ignore[no-untyped-def]
    """A backlog read at full speed covers days of event time within one checkpoint
    interval; the trainer also publishes every `publish_every_hours` of event time it
    learns once the model has settled (here at once), so no worker assigns with a model
    days behind the trained one. With the segments kept as seeded (no refit publishes)
    and a 600 s interval, each publication after the first is one of those."""
    model = settings.model.model_copy(
        update={
            "checkpoint_interval_s": 600.0,
            "publish_every_hours": 12.0,
            "adaptation": False,
            "settle_days": 0.0,
        }
    )
    kafka = settings.kafka.model_copy(update={"max_poll_records": 100})  # about 5 h a poll
    backlog = settings.model_copy(update={"model": model, "kafka": kafka})
    ensure_topics(backlog.kafka, partitions=2)
    shop = generate(users=300, events=6000, seed=74)
    produce(shop.events, backlog)
    running = start_worker(backlog)
    wait_for(lambda: applied(redis_client, "seg") == 6000, timeout=120, what="the backlog")
    trainer = running.worker.coordinator.trainer
    assert trainer is not None
    times = [event_ms(event) for event in shop.events]
    half_days = (times[-1] - times[0]) / HOUR_MS / 12
    # seeded after the first users' windows closed: about one a half-day from then on
    wait_for(lambda: running.worker.model.revision >= half_days / 2, timeout=20, what="adopted")
    assert trainer.revision <= half_days + 2, (trainer.revision, half_days)


def test_the_trainer_merges_each_workers_profiles_by_event_time(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Two followers' profiles reach the trainer a batch of one after a batch of the
    other; it learns them interleaved by event time, each worker's in its own order, as
    one worker would have learned them (the detectors are order-sensitive)."""
    trainer, a, b = (coordinator(settings, redis_client, name) for name in ("t", "a", "b"))
    x = {name: 1.0 for name in FEATURES}
    a.learn([("a1", x, 1), ("a2", x, 3)])
    b.learn([("b1", x, 2), ("b2", x, 4)])
    trainer.learn([("own", x, 0)])
    assert trainer.trainer is not None
    assert list(trainer.trainer.reservoir) == ["own", "a1", "b1", "a2", "b2"]


def test_a_sale_in_another_workers_events_is_detected_by_the_trainer(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The `events` detector of the trainer watches every worker's events: the others hand
    it samples of their event mix. Watching its own partitions only, it saw 1/N of the
    events and caught a sale N times later."""
    trainer = seeded_trainer(settings, redis_client)
    follower = coordinator(settings, redis_client, "follower")
    assert not follower.leading
    rng = random.Random(5)

    def turns(events: list[ClickEvent | PurchaseEvent]) -> set[str]:
        """The follower applies the events a batch at a time; what the trainer detected."""
        detected = set()
        for start in range(0, len(events), 500):
            assert all(follower.observe(event) is None for event in events[start : start + 500])
            follower.learn([])
            for _, learned in trainer.learn([]):
                detected.update(learned.drifts)
        return detected

    assert not turns(event_mix(rng, 0.025, 40_000)), "a false alarm on a steady event mix"
    assert turns(event_mix(rng, 0.06, 2000, start_ts=40_000_000)) == {"events"}
    assert trainer.trainer is not None
    assert trainer.trainer.detectors.moved == ["purchase share of events"]
