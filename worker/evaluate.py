"""`segment-worker evaluate`: segment quality, stability and drift response, measured
through the real pipeline (or, with `--replay`, through the model and profile code alone:
deterministic and faster, for trying model changes).

A generated shop (personas as ground truth, and with the drift schedule: a sale, then a
persona that appears mid-stream) is produced to a broker in event-time order while a
worker consumes it into Redis exactly as deployed, and the figures are computed from what other
services would see: the segments stored in Redis, the `segment-changes` and
`segment-lifecycle` topics.

* quality: ARI and NMI of the stored segments against the personas, and of scikit-learn
  k-means (k-means++, k = the live segments) fitted on the same final profiles; ARI
  between the two; the silhouette of both on the standardized profiles;
* stability: the share of users whose segment changed per day of event time on the
  stationary part (from `model.settle_days` after seeding, when a cold-started shop's
  profiles have matured, to the first drift);
* drift: per scheduled drift, the delay to the first detection after it, in events and
  in event time, and to the first new segment; false alarms per 100k stationary events;
* recovery: from what Redis held at the new persona's onset and `RECOVERY_EVENTS` later
  (the shop waits for the worker at those two moments and the evaluation reads Redis),
  ARI of the stored segments and of batch k-means on the same profiles, and whether each
  id's centroid stayed nearest to the same persona (persona centres: their members' mean
  profile at that moment), from the onset to then and to the end;
* meaning: the same look at each id's nearest persona over the stationary part, when the
  model settles, every week after and at the first drift's onset (the shop waits for the
  worker at each look as at the marks): an id nearest another persona later has changed
  meaning where nothing drifted.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import threading
import uuid
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from redis.exceptions import RedisError
from sklearn.cluster import KMeans as BatchKMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from config.settings import Settings
from schemas import EVENT_ADAPTER
from schemas.events import UserDeleted
from schemas.reader import SegmentReader, text
from schemas.records import RedisKeys
from worker.app import Worker, settled_gc
from worker.drift import EventMix
from worker.features import FEATURES, FeatureExtractor
from worker.generator import DRIFTS, SHOP_EVENTS, SHOP_USERS, STARTS, Shop, event_ms, generate
from worker.learning import LearningWindows
from worker.metrics import Metrics
from worker.model import SegmentModel
from worker.profiles import DAY_MS, Position, Profile, ProfileUpdater
from worker.replay import produce
from worker.sink import connect, delete_keys, stored_profiles
from worker.source import delete_topics, ensure_topics, kafka_client_config

log = logging.getLogger(__name__)

SILHOUETTE_SAMPLE = 5000
PARTITIONS = 4
LEAD = 5000  # events the shop may be ahead of the worker
WEEK_DAYS = 7  # `stability` also reports moves by week of the stationary part
WEEK_MS = WEEK_DAYS * DAY_MS
RECOVERY_EVENTS = 10_000  # events after the new persona's onset when ARI is taken again
PERSONA_FLOOR = 20  # users a persona needs at a snapshot to have a centre there


@dataclass(frozen=True)
class Snapshot:
    """What Redis held at one moment: every user's segment and profile, and every live
    segment's centroid (original units)."""

    segments: dict[str, str]
    profiles: dict[str, Profile]
    centroids: dict[str, dict[str, float]]


@dataclass
class Looks:
    """When to look at what each id means over the stationary part: once the model
    the workers assign with has settled (learned past its settling time), every
    `WEEK_DAYS` after, and at `end`, the first drift's onset. When it settles is known
    only as the stream goes, so the looks fall due then, not planned as the marks are."""

    times: np.ndarray  # the shop's event times, in its (event-time) order
    end: int
    taken: list[tuple[int, Snapshot]] = field(default_factory=list)

    def due(self, offset: int, settled_at: float | None) -> int | None:
        """The event time of a look due before the shop's event at `offset`, if one is;
        `settled_at` is given once the model has settled."""
        if settled_at is None or settled_at >= self.end:
            return None
        if not self.taken:  # as soon as it settled
            at = int(max(settled_at, self.times[offset]))
            return at if at < self.end else None
        last = self.taken[-1][0]
        if last >= self.end:
            return None
        at = min(last + WEEK_MS, self.end)
        return at if self.times[offset] >= at else None


@dataclass
class Outcome:
    """What a run left for scoring: Redis at the marks, at the looks and at the end,
    the `segment-lifecycle` and `segment-changes` messages, the events applied, and the
    moves of the sweep that placed everyone afresh when the model settled."""

    snapshots: list[Snapshot]
    end: Snapshot
    lifecycle: list[dict[str, Any]]
    changes: list[dict[str, Any]]
    applied: int
    settled_moves: int
    looks: list[tuple[int, Snapshot]]


@dataclass
class Evaluation:
    settings: Settings
    users: int = SHOP_USERS
    events: int = SHOP_EVENTS
    seed: int = 7
    drifts: tuple[str, ...] = DRIFTS  # the drift schedule (`generator.scenario`)
    starts: Mapping[str, float] = field(default_factory=STARTS.copy)  # and when each starts
    replay: bool = False  # the model and profile code alone, without Kafka and Redis
    cut: int | None = None  # a replay cut as fetched, by this seed (`Cut`)
    workers: int = 1  # in the pipeline: a consumer group of this many, one model

    def run(self) -> dict[str, Any]:
        settings = self._own_topics()
        shop = generate(self.users, self.events, self.seed, self.drifts, self.starts)
        times = np.array([event_ms(e) for e in shop.events])
        # Moments to look at: the new persona's onset and RECOVERY_EVENTS later.
        onset = shop.drifts.get("new_persona")
        first = int(np.searchsorted(times, onset)) if onset is not None else len(times)
        marks = [at for at in (first, first + RECOVERY_EVENTS) if at < len(times)]
        looks = Looks(times, end=min(shop.drifts.values(), default=int(times[-1])))
        with settled_gc():  # the worker or the replay runs here: freeze the shop's events too
            if self.replay:
                outcome = replay(settings, shop, marks, looks, Cut(self.cut))
            else:
                try:
                    outcome = self._pipeline(settings, shop, marks, looks)
                finally:
                    _forget(settings)
        return {
            "scenario": {
                "users": len(shop.truth),
                "events": len(shop.events),
                "personas": len(set(shop.truth.values())),
                "drifts": {name: at for name, at in shop.drifts.items()},
                "starts": {name: self.starts[name] for name in shop.drifts},
                "applied": outcome.applied,
                "through": self._through,
                **({} if self.replay else {"workers": self.workers}),
            },
            "quality": quality(settings, shop.truth, outcome.end.segments, outcome.end.profiles),
            "stability": stability(
                shop, outcome.lifecycle, outcome.changes, settings.model.settle_days
            )
            | {"moves_when_settled": outcome.settled_moves},
            "recovery": recovery(settings, shop.truth, outcome.snapshots, outcome.end),
            "meaning": meaning(settings, shop.truth, outcome.looks),
            "drift": drift_response(shop, times, outcome.lifecycle, settings.model.settle_days),
            "segments": composition(shop.truth, outcome.end.segments),
        }

    @property
    def _through(self) -> str:
        if not self.replay:
            return "pipeline"
        return "replay" if self.cut is None else f"replay cut as fetched (seed {self.cut})"

    def _pipeline(self, settings: Settings, shop: Shop, marks: list[int], looks: Looks) -> Outcome:
        """Through the real pipeline: produced to the broker while in-process workers (a
        consumer group sharing one model, as deployed) segment it into Redis; Redis read
        at the marks, at the looks and at the end."""
        snapshots: list[Snapshot] = []
        # As a live shop sends them: while the workers run, at most LEAD events ahead of
        # them, on one topic. (Pre-produced over two topics and several partitions, they
        # are read at different paces in event time, which smears a drift's onset over
        # the skew.)
        ensure_topics(settings.kafka, PARTITIONS)
        stop = threading.Event()
        workers = [Worker(settings, Metrics(), stop) for _ in range(self.workers)]
        running = [threading.Thread(target=worker.run, daemon=True) for worker in workers]
        for thread in running:
            thread.start()

        def applied() -> int:
            return sum(worker.totals.applied for worker in workers)

        def behind(events: int) -> bool:
            return applied() < events and all(thread.is_alive() for thread in running)

        def settled_at() -> float | None:
            settled = [worker.model for worker in workers if worker.model.settled]
            return settled[0].settled_at if settled else None

        def live() -> Iterator[dict[str, object]]:
            for sent, event in enumerate(shop.events):
                look = looks.due(sent, settled_at())
                if sent in marks or look is not None:  # the worker applies all before
                    while behind(sent):
                        stop.wait(0.05)
                    snapshot = self._snapshot(settings)
                    if sent in marks:
                        snapshots.append(snapshot)
                    if look is not None:
                        looks.taken.append((look, snapshot))
                while behind(sent - LEAD):
                    stop.wait(0.05)
                yield event

        try:
            produce(live(), settings, topic=settings.kafka.clickstream_topic)
            while behind(len(shop.events)):
                stop.wait(0.5)
        finally:  # every event applied, or cut short: stop as SIGTERM would (drain, publish)
            stop.set()
            for thread in running:
                thread.join()
        if applied() != len(shop.events):
            raise RuntimeError(
                f"the workers stopped after {applied():,} of {len(shop.events):,} events; "
                "see their log"
            )
        settled = (
            worker.metrics.registry.get_sample_value(
                "segmentation_segment_changes_total", {"cause": "settled"}
            )
            for worker in workers
        )
        return Outcome(
            snapshots,
            self._snapshot(settings),
            read_all(settings, settings.kafka.lifecycle_topic),
            read_all(settings, settings.kafka.changes_topic),
            applied(),
            int(sum(moves or 0 for moves in settled)),
            looks.taken,
        )

    def _own_topics(self) -> Settings:
        run = f"eval-{uuid.uuid4().hex[:6]}"
        kafka = self.settings.kafka.model_copy(
            update={
                "group_id": run,
                **{
                    f"{name}_topic": f"{run}-{name}"
                    for name in ("clickstream", "purchases", "dlq", "changes", "lifecycle")
                },
            }
        )
        redis = self.settings.redis.model_copy(update={"key_prefix": run})
        metrics = self.settings.metrics.model_copy(update={"host": "127.0.0.1", "port": 0})
        return self.settings.model_copy(update={"kafka": kafka, "redis": redis, "metrics": metrics})

    @staticmethod
    def _snapshot(settings: Settings) -> Snapshot:
        """Every user's stored segment and profile, and the live segments' centroids."""
        client = connect(settings.redis)
        keys = RedisKeys(settings.redis.key_prefix)
        profiles = {p.user_id: p for p in stored_profiles(client, keys)}
        pipe = client.pipeline(transaction=False)
        for user in profiles:
            pipe.hget(keys.user(user), "segment")
        segments = {
            user: text(segment)
            for user, segment in zip(profiles, pipe.execute(), strict=True)
            if segment
        }
        live = SegmentReader(client, settings.redis.key_prefix).segments()
        client.close()
        return Snapshot(
            segments,
            {user: profiles[user] for user in segments},
            {id_: record.centroid for id_, record in live.items()},
        )


def _forget(settings: Settings) -> None:
    """Delete the run's topics, group and keys (`_own_topics` names them all after the
    group): given servers are left as they were."""
    run = settings.kafka.group_id
    try:
        with connect(settings.redis) as client:
            delete_keys(client, f"{run}:*")
        delete_topics(settings.kafka, f"{run}-", [run])
    except (KafkaError, RedisError) as exc:  # do not hide why the run stopped
        log.warning("evaluate: could not delete all of run %s's keys and topics: %s", run, exc)


def read_all(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every message on a topic, decoded: read up to the end offsets taken at the start."""
    consumer = KafkaConsumer(**kafka_client_config(settings.kafka), enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    end = consumer.end_offsets(partitions)
    messages: list[dict[str, Any]] = []
    while any(consumer.position(tp) < end[tp] for tp in partitions):
        for records in consumer.poll(timeout_ms=1000).values():
            messages.extend(orjson.loads(r.value) for r in records)
    consumer.close()
    return messages


REPLAY_BATCH = 1500  # events per batch of the replay: about a poll batch of the pipeline
FETCHED_RECORDS = 500  # a cut replay's most records of one partition per poll
POLL_S = 0.05  # a cut replay's poll period, for the learning windows' idle partitions


@dataclass(frozen=True)
class Cut:
    """How a replay cuts the shop into poll batches. Without a seed: in exact event-time
    order, `REPLAY_BATCH` events at a time, all from one partition. With one: as a worker's
    fetches might, reproducibly. Each input topic has `PARTITIONS` partitions (users by a
    hash of their id), the shop is at most `LEAD` events ahead of what was read, and each
    poll takes up to `FETCHED_RECORDS` from each of a random subset of partitions. So the
    pipeline's dependence on how a run was cut can be replayed and traced event by event."""

    seed: int | None = None

    def partition(self, event: dict[str, object]) -> tuple[str, int]:
        if self.seed is None:
            return "replay", 0
        topic = "purchases" if event["event_type"] == "purchase" else "clicks"
        return topic, zlib.crc32(str(event["user_id"]).encode()) % PARTITIONS

    def batches(self, events: list[dict[str, object]], marks: list[int]) -> Iterator[list[int]]:
        """Batches of event offsets (into `events`, in event-time order); with no seed,
        split at the `marks`."""
        if self.seed is None:
            bounds = sorted({*range(0, len(events), REPLAY_BATCH), *marks, len(events)})
            for start, stop in itertools.pairwise(bounds):
                yield list(range(start, stop))
            return
        rng = random.Random(self.seed)
        queues: dict[tuple[str, int], deque[int]] = defaultdict(deque)
        for offset, event in enumerate(events):
            queues[self.partition(event)].append(offset)
        partitions, read = sorted(queues), 0
        while read < len(events):
            produced = read + LEAD
            chosen = [p for p in partitions if rng.random() < 0.4] or [rng.choice(partitions)]
            batch = [o for p in chosen for o in _take(queues[p], produced)]
            if not batch:  # the chosen ones have nothing yet: the one furthest behind
                behind = min((q for q in queues.values() if q), key=lambda q: q[0])
                batch = _take(behind, produced)
            read += len(batch)
            yield batch


def _take(queue: deque[int], below: int) -> list[int]:
    """Up to FETCHED_RECORDS offsets from the head of `queue` that are below `below`."""
    taken: list[int] = []
    while queue and len(taken) < FETCHED_RECORDS and queue[0] < below:
        taken.append(queue.popleft())
    return taken


def replay(
    settings: Settings, shop: Shop, marks: list[int], looks: Looks, cut: Cut = Cut()
) -> Outcome:
    """The shop through the profile and model code alone, cut into batches by `cut`: no
    broker, no Redis, no worker. Deterministic and several times faster than the
    pipeline, for trying model changes; the figures that count are the pipeline's (it
    assigns with a published copy of the model that lags the trained one by seconds,
    which does not happen here).

    Per batch it does what the worker does: folds each event into its user's profile,
    shows it to the `events` detector, learns from the windows of event time that closed
    (`worker/learning.py`), and assigns with the margin. After an adaptation that merged
    or retired a segment, that segment's users move to the nearest live one, and once
    the model has settled every user is placed afresh, as workers do."""
    updater, extract = ProfileUpdater(settings.profile), FeatureExtractor(settings.profile)
    model, mix = SegmentModel(settings.model), EventMix()
    polls = 0  # the learning windows' clock: a poll every POLL_S
    learning = LearningWindows(
        settings.model.learn_window_minutes,
        settings.model.learn_window_users,
        extract,
        clock=lambda: polls * POLL_S,
    )
    profiles: dict[str, Profile] = {}
    snapshots: list[Snapshot] = []
    changes: list[dict[str, Any]] = []
    pending: set[str] = set()  # users seen before the model was seeded

    def place(users: list[str]) -> None:
        chosen = [profiles[u] for u in users]
        assignments = model.assign_many(
            [extract(p) for p in chosen], [p.segment for p in chosen], [p.last_ts for p in chosen]
        )
        for profile, assignment in zip(chosen, assignments, strict=True):
            if assignment.segment != profile.segment:
                changes.append(
                    {
                        "user_id": profile.user_id,
                        "from": profile.segment,
                        "to": assignment.segment,
                        "model_version": model.version,
                        "timestamp": profile.last_ts,
                    }
                )
                profile.segment = assignment.segment

    def snapshot() -> Snapshot:
        placed = {u: p for u, p in profiles.items() if p.segment is not None}
        return Snapshot(
            {u: str(p.segment) for u, p in placed.items()},
            {u: copy.deepcopy(p) for u, p in placed.items()},
            {seg.id: model.centroid(i) for i, seg in model.segments.items()},
        )

    waiting = sorted(marks)  # snapshots are taken once this many events are read
    read = 0
    settled_moves: int | None = None  # of the sweep when the model settles, once done
    for batch in cut.batches(shop.events, marks):
        polls += 1
        while waiting and read >= waiting[0]:
            snapshots.append(snapshot())
            waiting.pop(0)
        # the batch's earliest event (a cut batch is not in event-time order)
        if (look := looks.due(min(batch), model.settled_at if model.settled else None)) is not None:
            looks.taken.append((look, snapshot()))
        touched: dict[str, Profile] = {}
        folded = []
        for offset in batch:
            event = EVENT_ADAPTER.validate_python(shop.events[offset])
            assert not isinstance(event, UserDeleted)  # the generator deletes no one
            topic, partition = cut.partition(shop.events[offset])
            profile = profiles.setdefault(event.user_id, Profile(event.user_id))
            learning.before_fold(profile, event.timestamp)
            updater.apply(profile, event, Position(topic, partition, offset))
            learning.after_fold(profile, event.timestamp, (topic, partition))
            touched[event.user_id] = profile
            folded.append(event)
        read += len(batch)
        for event in sorted(folded, key=attrgetter("timestamp")):  # as the worker shows them
            if (sample := mix.add(event)) is not None:
                model.observe(sample, event.timestamp)
        live = {seg.id for seg in model.segments.values()}
        for user, x, event_ts in learning.take(len(batch)):
            model.learn_one(user, x, event_ts)
        if not model.ready:
            pending.update(touched)
            continue
        gone = live - {seg.id for seg in model.segments.values()}  # merged or retired now
        stranded = [u for u, p in profiles.items() if p.segment in gone] if gone else []
        if settled_moves is None and model.settled:
            before = len(changes)  # the model has settled: everyone afresh
            place([u for u, p in profiles.items() if p.segment and u not in touched])
            settled_moves = len(changes) - before
        place(list(dict.fromkeys([*touched, *stranded, *pending])))
        pending.clear()
    lifecycle = [m.model_dump() for m in model.lifecycle]
    return Outcome(
        snapshots, snapshot(), lifecycle, changes, len(shop.events), settled_moves or 0, looks.taken
    )


def quality(
    settings: Settings,
    truth: dict[str, str],
    segments: dict[str, str],
    profiles: dict[str, Profile],
) -> dict[str, Any]:
    users = sorted(segments)
    points = _standardized(_features(settings, users, profiles))
    personas = [truth[u] for u in users]
    streaming = [segments[u] for u in users]
    k = len(set(streaming))
    batch = _batch(settings, points, k)

    def silhouette(labels: Any) -> float:
        if len(set(labels)) < 2:
            return 0.0
        sample = min(SILHOUETTE_SAMPLE, len(users))
        return float(silhouette_score(points, labels, sample_size=sample, random_state=0))

    ari_streaming = float(adjusted_rand_score(personas, streaming))
    ari_batch = float(adjusted_rand_score(personas, batch))
    return {
        "users": len(users),
        "segments": k,
        "ari_streaming": round(ari_streaming, 3),
        "ari_batch": round(ari_batch, 3),
        "ari_ratio": round(ari_streaming / ari_batch, 3) if ari_batch > 0 else None,
        "ari_streaming_vs_batch": round(float(adjusted_rand_score(streaming, batch)), 3),
        "nmi_streaming": round(float(normalized_mutual_info_score(personas, streaming)), 3),
        "nmi_batch": round(float(normalized_mutual_info_score(personas, batch)), 3),
        "silhouette_streaming": round(silhouette(streaming), 3),
        "silhouette_batch": round(silhouette(batch), 3),
    }


def _features(settings: Settings, users: list[str], profiles: dict[str, Profile]) -> np.ndarray:
    """The users' feature vectors (rows), original units."""
    extract = FeatureExtractor(settings.profile)
    return np.array([[extract(profiles[u])[f] for f in FEATURES] for u in users])


def _standardized(points: np.ndarray) -> np.ndarray:
    return np.asarray((points - points.mean(axis=0)) / np.maximum(points.std(axis=0), 1e-9))


def _batch(settings: Settings, points: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn k-means labels (k-means++), as the batch alternative would fit them."""
    fit = BatchKMeans(n_clusters=k, init="k-means++", n_init=4, random_state=settings.model.seed)
    return np.asarray(fit.fit_predict(points))


def recovery(
    settings: Settings, truth: dict[str, str], snapshots: list[Snapshot], end: Snapshot
) -> dict[str, Any] | None:
    """How the segments answer the new persona, from Redis at its onset and
    `RECOVERY_EVENTS` later: ARI against the personas of the stored segments and of batch
    k-means on the same profiles (same k), the ids live at the onset whose centroid is
    nearest to another persona later (then, and at the end): ids that changed meaning;
    and the persona nearest each id added since the onset. None if the new persona
    came before the model had seeded: no segment was there to answer it."""
    if len(snapshots) < 2 or not snapshots[0].segments:
        return None
    onset, after = snapshots
    users = sorted(after.segments)
    k = len(set(after.segments.values()))
    batch = _batch(settings, _standardized(_features(settings, users, after.profiles)), k)
    then, soon, last = (nearest_personas(settings, truth, s) for s in (onset, after, end))
    return {
        "events_after_onset": RECOVERY_EVENTS,
        "ari_at_onset": _ari(truth, onset.segments),
        "ari": _ari(truth, after.segments),
        "ari_batch": round(float(adjusted_rand_score([truth[u] for u in users], batch)), 3),
        "nearest_persona": {"onset": then, "after": soon, "end": last},
        "ids_compared": len(then.keys() & soon.keys()),
        "changed_meaning": _changed(then, soon),
        "ids_compared_by_end": len(then.keys() & last.keys()),
        "changed_meaning_by_end": _changed(then, last),
        # which persona the ids made since the onset stand for: is one the new persona's?
        "added": {i: last[i] for i in sorted(last.keys() - then.keys(), key=_id_order)},
    }


def meaning(
    settings: Settings, truth: dict[str, str], looks: list[tuple[int, Snapshot]]
) -> dict[str, Any] | None:
    """Whether each id kept its meaning over the stationary part, where nothing
    drifted: its nearest persona at every look against the first (when the model
    settled). A refit that hands an id another group's centre shows here as a change,
    with the days after settling of the first look that saw it."""
    if len(looks) < 2:
        return None
    (settled, first), *later = looks
    then = nearest_personas(settings, truth, first)
    changed: dict[str, str] = {}
    for at, snapshot in later:
        for id_, change in _changed(then, nearest_personas(settings, truth, snapshot)).items():
            changed.setdefault(id_, f"{change} ({(at - settled) / DAY_MS:.1f} days)")
    return {
        "looks_days": [round((at - settled) / DAY_MS, 1) for at, _ in looks],
        "nearest_persona": then,
        "ids_compared": len(then.keys() & {i for _, s in later for i in s.centroids}),
        "changed_meaning": dict(sorted(changed.items(), key=lambda item: _id_order(item[0]))),
    }


def nearest_personas(settings: Settings, truth: dict[str, str], at: Snapshot) -> dict[str, str]:
    """Each live segment's nearest persona at a snapshot: its centroid against the mean
    profile of each persona with `PERSONA_FLOOR` users, standardized by the population of
    that moment (an id means the kind of shopper its centre sits among)."""
    users = sorted(at.profiles)
    points = _features(settings, users, at.profiles)
    mean, std = points.mean(axis=0), np.maximum(points.std(axis=0), 1e-9)
    labels = np.array([truth[u] for u in users])
    centres = {
        persona: (points[labels == persona].mean(axis=0) - mean) / std
        for persona in sorted(set(labels))
        if np.count_nonzero(labels == persona) >= PERSONA_FLOOR
    }
    nearest = {}
    for id_, centroid in at.centroids.items():
        z = (np.array([centroid[f] for f in FEATURES]) - mean) / std
        nearest[id_] = min(centres, key=lambda p: float(np.linalg.norm(z - centres[p])))
    return nearest


def _changed(then: dict[str, str], now: dict[str, str]) -> dict[str, str]:
    return {
        id_: f"{then[id_]} -> {now[id_]}"
        for id_ in sorted(then.keys() & now.keys(), key=_id_order)
        if now[id_] != then[id_]
    }


def _id_order(segment_id: str) -> int:
    """Segment ids by number: s2 before s10."""
    return int(segment_id[1:])


def _ari(truth: dict[str, str], segments: dict[str, str]) -> float:
    users = sorted(segments)
    return round(
        float(adjusted_rand_score([truth[u] for u in users], [segments[u] for u in users])), 3
    )


def _seeded_at(lifecycle: list[dict[str, Any]]) -> int | None:
    created = [m["timestamp"] for m in lifecycle if m["event"] == "created"]
    return min(created) if created else None


def stationary_part(
    shop: Shop, lifecycle: list[dict[str, Any]], settle_days: float
) -> tuple[int, int] | None:
    """Event time from when the segments settled (`model.settle_days` after seeding: the
    profiles of the cold-started shop have matured) to the first scheduled drift."""
    seeded = _seeded_at(lifecycle)
    end = min(shop.drifts.values(), default=event_ms(shop.events[-1]))
    if seeded is None or end <= seeded + settle_days * DAY_MS:
        return None
    return int(seeded + settle_days * DAY_MS), end


def stability(
    shop: Shop,
    lifecycle: list[dict[str, Any]],
    changes: list[dict[str, Any]],
    settle_days: float,
) -> dict[str, Any]:
    """Share of segmented users changing segment per day on the stationary part; how many
    users moved, and how many moves went back to the segment the user's previous move
    left (flapping), and how many went to their persona's home: the segment most of that
    persona's users are in at the end of the part (a user placed while their profile
    was young, moving where they belong); and the share per persona and per week of
    the part (a cold-started shop's profiles are still maturing when it begins)."""
    part = stationary_part(shop, lifecycle, settle_days)
    if part is None:
        return {"changes_per_user_per_day": None, "days": 0.0}
    start, end = part
    first_segment: dict[str, int] = {}
    left: dict[str, str] = {}  # per user, the segment their last move left
    returns = 0
    at_end: dict[str, str] = {}  # each user's segment at the end of the part
    went: list[tuple[str, str]] = []  # (persona, segment) of each move
    weeks = [0] * math.ceil((end - start) / WEEK_MS)  # moves in each week of the part
    for change in sorted(changes, key=lambda c: c["timestamp"]):
        user = change["user_id"]
        if change["timestamp"] < end and change["to"] is not None:
            at_end[user] = change["to"]
        if change["from"] is None:
            first_segment.setdefault(user, change["timestamp"])
        elif change["to"] is not None and start <= change["timestamp"] < end:
            went.append((shop.truth[user], change["to"]))
            weeks[(change["timestamp"] - start) // WEEK_MS] += 1
            if left.get(user) == change["to"]:
                returns += 1
            left[user] = change["from"]
    days = (end - start) / DAY_MS
    moves = Counter(persona for persona, _ in went)
    by_persona: dict[str, Counter[str]] = defaultdict(Counter)
    for user, segment in at_end.items():
        by_persona[shop.truth[user]][segment] += 1
    home = {persona: c.most_common(1)[0][0] for persona, c in by_persona.items()}
    segmented = Counter(shop.truth[u] for u, at in first_segment.items() if at < end)

    def rate(moved: int, users: int, span: float = days) -> float:
        return round(moved / max(users, 1) / span, 5)

    return {
        "changes_per_user_per_day": rate(moves.total(), segmented.total()),
        "moves": moves.total(),
        "users_moved": len(left),
        "moves_back": returns,
        "moves_home": sum(1 for persona, segment in went if home[persona] == segment),
        "users": segmented.total(),
        "days": round(days, 2),
        "by_persona": {
            persona: rate(moves[persona], users) for persona, users in sorted(segmented.items())
        },
        "by_week": [
            rate(moved, segmented.total(), min(days - WEEK_DAYS * n, WEEK_DAYS))
            for n, moved in enumerate(weeks)
        ],
    }


def drift_response(
    shop: Shop, times: np.ndarray, lifecycle: list[dict[str, Any]], settle_days: float
) -> dict[str, Any]:
    """Per scheduled drift: delay to the first detection and the first new segment after
    it; and false alarms on the stationary part. `times`: as for `recovery`."""
    seeded = _seeded_at(lifecycle) or 0
    detections = sorted(m["timestamp"] for m in lifecycle if m["event"] == "drift_detected")
    created = sorted(
        m["timestamp"] for m in lifecycle if m["event"] == "created" and m["timestamp"] > seeded
    )

    def delay(onset: int, at: list[int]) -> dict[str, Any] | None:
        after = [t for t in at if t >= onset]
        if not after:
            return None
        events = int(np.searchsorted(times, after[0], "right") - np.searchsorted(times, onset))
        return {"events": events, "hours": round((after[0] - onset) / 3_600_000, 2)}

    start, end = stationary_part(shop, lifecycle, settle_days) or (0, 0)
    stationary_events = int(np.searchsorted(times, end) - np.searchsorted(times, start))
    false_alarms = Counter(
        m["detector"]
        for m in lifecycle
        if m["event"] == "drift_detected" and start <= m["timestamp"] < end
    )
    by_detector: dict[str, dict[str, Any]] = defaultdict(dict)
    for name, onset in shop.drifts.items():
        for detector in {m["detector"] for m in lifecycle if m["event"] == "drift_detected"}:
            at = sorted(
                m["timestamp"]
                for m in lifecycle
                if m["event"] == "drift_detected" and m["detector"] == detector
            )
            by_detector[name][detector] = delay(onset, at)
    return {
        "scheduled": {
            name: {
                "onset": onset,
                "first_detection": delay(onset, detections),
                "by_detector": by_detector[name],
                "first_new_segment": delay(onset, created),
            }
            for name, onset in shop.drifts.items()
        },
        "false_alarms_per_100k": (
            round(false_alarms.total() / stationary_events * 100_000, 2)
            if stationary_events
            else None
        ),
        "false_alarms_by_detector": dict(false_alarms),
        "stationary_events": stationary_events,
        "detections": len(detections),
        "lifecycle": dict(Counter(m["event"] for m in lifecycle)),
    }


def composition(truth: dict[str, str], segments: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each stored segment's size and its most common persona (with that persona's share)."""
    members: dict[str, Counter[str]] = defaultdict(Counter)
    for user, segment in segments.items():
        members[segment][truth[user]] += 1
    result = {}
    for segment in sorted(members, key=_id_order):
        personas = members[segment]
        persona, n = personas.most_common(1)[0]
        result[segment] = {
            "users": personas.total(),
            "persona": persona,
            "purity": round(n / personas.total(), 3),
        }
    return result


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows for the summary table."""
    q, s, d = figures["quality"], figures["stability"], figures["drift"]
    through, workers = figures["scenario"]["through"], figures["scenario"].get("workers")
    table = [
        ("through", through + (f", {workers} worker(s)" if workers else ""), ""),
        (
            "drift schedule (fraction of the timeline)",
            ", ".join(f"{name} at {at}" for name, at in figures["scenario"]["starts"].items())
            or "none: stationary",
            "",
        ),
        ("ARI streaming vs personas", f"{q['ari_streaming']}", "≥ 0.85"),
        ("ARI batch k-means vs personas", f"{q['ari_batch']}", ""),
        ("ARI streaming / batch", f"{q['ari_ratio']}", "≥ 0.95"),
        ("ARI streaming vs batch", f"{q['ari_streaming_vs_batch']}", ""),
        ("NMI streaming / batch", f"{q['nmi_streaming']} / {q['nmi_batch']}", ""),
        (
            "silhouette streaming / batch",
            f"{q['silhouette_streaming']} / {q['silhouette_batch']}",
            "",
        ),
        ("segments (live)", f"{q['segments']}", ""),
        ("changed segment per user per day", f"{s['changes_per_user_per_day']}", "≤ 0.01"),
        (
            "the same, by persona",
            ", ".join(f"{p}: {v}" for p, v in s.get("by_persona", {}).items()),
            "",
        ),
        (
            "the same, by week of the stationary part",
            ", ".join(map(str, s.get("by_week", []))),
            "",
        ),
        (
            "moves, users moved, moves back, moves home (stationary part)",
            f"{s.get('moves')}, {s.get('users_moved')}, {s.get('moves_back')}, "
            f"{s.get('moves_home')}",
            "",
        ),
        ("moves when the model settled (everyone placed afresh)", f"{s['moves_when_settled']}", ""),
        ("false alarms per 100k stationary events", f"{d['false_alarms_per_100k']}", "≤ 1"),
    ]
    if m := figures["meaning"]:
        days = ", ".join(map(str, m["looks_days"]))
        kept = _kept(m["ids_compared"], m["changed_meaning"])
        table.append((f"ids nearest the same persona, stationary (days {days})", kept, "all"))
    if r := figures["recovery"]:
        after = f"{r['events_after_onset']:,} events after the new persona"
        table.append(("ARI at the new persona's onset", f"{r['ari_at_onset']}", ""))
        table.append((f"ARI {after}", f"{r['ari']} (batch {r['ari_batch']})", "≥ 0.85"))
        for window, compared, changed in (
            (after, r["ids_compared"], r["changed_meaning"]),
            ("at the end", r["ids_compared_by_end"], r["changed_meaning_by_end"]),
        ):
            table.append(
                (f"ids nearest the same persona {window}", _kept(compared, changed), "all")
            )
        added = ", ".join(f"{i}: {persona}" for i, persona in r["added"].items())
        table.append(("ids added since the onset, nearest persona at the end", added, ""))
    for name, drift in d["scheduled"].items():
        first = drift["first_detection"]
        new = drift["first_new_segment"]
        table.append(
            (
                f"{name}: first detection",
                f"{first['events']} events, {first['hours']} h" if first else "none",
                "≤ 2,000 events",
            )
        )
        table.append(
            (
                f"{name}: first new segment",
                f"{new['events']} events, {new['hours']} h" if new else "none",
                "≤ 10,000 events" if name == "new_persona" else "",
            )
        )
    return table


def _kept(compared: int, changed: dict[str, str]) -> str:
    """ "5/6 s4: lapsing_customer -> new_visitor": ids kept of those compared, and the rest."""
    moved = ", ".join(f"{i}: {change}" for i, change in changed.items())
    return f"{compared - len(changed)}/{compared} {moved}".strip()
