"""`segment-worker evaluate`: segment quality, stability and drift response, measured
through the real pipeline.

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
  in event time, and to the first new segment; false alarms per 100k stationary events.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition
from sklearn.cluster import KMeans as BatchKMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from config.settings import Settings
from schemas.reader import text
from schemas.records import RedisKeys
from worker.app import Worker
from worker.features import FEATURES, FeatureExtractor
from worker.generator import Shop, event_ms, generate
from worker.metrics import Metrics
from worker.profiles import DAY_MS, Profile
from worker.replay import produce
from worker.sink import connect, stored_profiles
from worker.source import ensure_topics, kafka_client_config

SILHOUETTE_SAMPLE = 5000
PARTITIONS = 4
LEAD = 5000  # events the shop may be ahead of the worker
RECOVERY_EVENTS = 10_000  # events after the new persona's onset when ARI is taken again


@dataclass
class Evaluation:
    settings: Settings
    users: int = 20_000
    events: int = 2_000_000
    seed: int = 7
    drifts: bool = True

    def run(self) -> dict[str, Any]:
        settings = self._own_topics()
        shop = generate(self.users, self.events, seed=self.seed, drifts=self.drifts)
        # As a live shop sends them: while the worker runs, at most LEAD events ahead of
        # it, on one topic. (Pre-produced over two topics and several partitions, they
        # are read at different paces in event time, which smears a drift's onset over
        # the skew.)
        ensure_topics(settings.kafka, PARTITIONS)
        stop = threading.Event()
        worker = Worker(settings, Metrics(), stop)
        running = threading.Thread(target=worker.run, daemon=True)
        running.start()

        def live() -> Iterator[dict[str, object]]:
            for sent, event in enumerate(shop.events):
                while sent - worker.totals.applied > LEAD and running.is_alive():
                    stop.wait(0.05)
                yield event

        produce(live(), settings, topic=settings.kafka.clickstream_topic)
        while running.is_alive() and worker.totals.applied < len(shop.events):
            stop.wait(0.5)  # every event applied: stop, as SIGTERM would (drain, publish)
        stop.set()
        running.join()
        if worker.totals.applied != len(shop.events):
            raise RuntimeError(
                f"the worker stopped after {worker.totals.applied:,} of "
                f"{len(shop.events):,} events; see its log"
            )
        segments, profiles = self._stored(settings)
        lifecycle = read_all(settings, settings.kafka.lifecycle_topic)
        changes = read_all(settings, settings.kafka.changes_topic)
        times = np.array([event_ms(e) for e in shop.events])
        return {
            "scenario": {
                "users": len(shop.truth),
                "events": len(shop.events),
                "personas": len(set(shop.truth.values())),
                "drifts": {name: at for name, at in shop.drifts.items()},
                "applied": worker.totals.applied,
            },
            "quality": quality(settings, shop.truth, segments, profiles),
            "stability": stability(shop, lifecycle, changes, settings.model.settle_days),
            "recovery": recovery(shop, times, changes, segments),
            "drift": drift_response(shop, times, lifecycle, settings.model.settle_days),
            "segments": composition(shop.truth, segments),
        }

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
    def _stored(settings: Settings) -> tuple[dict[str, str], dict[str, Profile]]:
        """Every user's stored segment and profile."""
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
        client.close()
        return segments, {user: profiles[user] for user in segments}


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


def quality(
    settings: Settings,
    truth: dict[str, str],
    segments: dict[str, str],
    profiles: dict[str, Profile],
) -> dict[str, Any]:
    users = sorted(segments)
    extract = FeatureExtractor(settings.profile)
    points = np.array([[extract(profiles[u])[f] for f in FEATURES] for u in users])
    points = (points - points.mean(axis=0)) / np.maximum(points.std(axis=0), 1e-9)
    personas = [truth[u] for u in users]
    streaming = [segments[u] for u in users]
    k = len(set(streaming))
    batch = BatchKMeans(
        n_clusters=k, init="k-means++", n_init=4, random_state=settings.model.seed
    ).fit_predict(points)

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


def recovery(
    shop: Shop, times: np.ndarray, changes: list[dict[str, Any]], segments: dict[str, str]
) -> dict[str, Any] | None:
    """How the segments answer the new persona, rebuilt from `segment-changes`: ARI against
    the personas at its onset and `RECOVERY_EVENTS` events later, and which ids existing at
    the onset (and still live at the end) stand for another persona at the end: their
    members' main persona moved. `times`: the event time of each of the shop's events."""
    onset = shop.drifts.get("new_persona")
    if onset is None:
        return None
    after = int(np.searchsorted(times, onset)) + RECOVERY_EVENTS
    if after >= len(times):
        return None
    ordered = sorted(changes, key=lambda c: c["timestamp"])
    before, later = _segments_at(ordered, onset), _segments_at(ordered, int(times[after]))
    then, now = composition(shop.truth, before), composition(shop.truth, segments)
    return {
        "events_after_onset": RECOVERY_EVENTS,
        "ari_at_onset": _ari(shop.truth, before),
        "ari": _ari(shop.truth, later),
        "ids_compared": len(then.keys() & now.keys()),
        "changed_meaning": {
            id_: f"{then[id_]['persona']} -> {now[id_]['persona']}"
            for id_ in sorted(then.keys() & now.keys(), key=lambda i: int(i[1:]))
            if now[id_]["persona"] != then[id_]["persona"]
        },
    }


def _segments_at(ordered: list[dict[str, Any]], at: int) -> dict[str, str]:
    """Each user's segment as published up to event time `at` (`ordered` by it)."""
    segment: dict[str, str] = {}
    for change in ordered:
        if change["timestamp"] > at:
            break
        if change["to"] is None:
            segment.pop(change["user_id"], None)
        else:
            segment[change["user_id"]] = change["to"]
    return segment


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
    """Share of segmented users changing segment per day on the stationary part."""
    part = stationary_part(shop, lifecycle, settle_days)
    if part is None:
        return {"changes_per_user_per_day": None, "days": 0.0}
    start, end = part
    first_segment: dict[str, int] = {}
    moves = 0
    for change in changes:
        if change["from"] is None:
            first_segment.setdefault(change["user_id"], change["timestamp"])
        elif change["to"] is not None and start <= change["timestamp"] < end:
            moves += 1
    days = (end - start) / DAY_MS
    segmented = sum(1 for at in first_segment.values() if at < end)
    return {
        "changes_per_user_per_day": round(moves / max(segmented, 1) / days, 5),
        "moves": moves,
        "users": segmented,
        "days": round(days, 2),
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
    for segment, personas in sorted(members.items(), key=lambda kv: int(kv[0][1:])):
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
    table = [
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
        ("false alarms per 100k stationary events", f"{d['false_alarms_per_100k']}", "≤ 1"),
    ]
    if r := figures["recovery"]:
        after = f"ARI {r['events_after_onset']:,} events after the new persona"
        table.append(("ARI at the new persona's onset", f"{r['ari_at_onset']}", ""))
        table.append((after, f"{r['ari']}", "≥ 0.85"))
        changed = ", ".join(f"{i}: {m}" for i, m in r["changed_meaning"].items())
        kept = f"{r['ids_compared'] - len(r['changed_meaning'])}/{r['ids_compared']} {changed}"
        table.append(("ids that kept their main persona", kept.strip(), "all"))
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
