"""River clustering behind stable, named segment ids.

The model of record is River: a `StandardScaler` learns the population online and a
`KMeans` learns the segment centres online. Two things River does not do are added here:

* Seeding. River's KMeans starts from random Gaussian centres, which strands centres in
  empty space. Instead the first `warmup_users` profiles are buffered, a k-means++
  seeded batch k-means (scikit-learn) is fitted on them, and its centres become River's
  starting centres. Users seen during warm-up get their segment at that moment.
* Identity. Consumers of `seg:user:*` need segment ids that keep their meaning, and
  people need names. Each River cluster index is bound to a stable id (`s1`, `s2`, ...)
  and named from its centroid in original units compared with the population.

Learning and assigning are separate calls so that one worker can train while every
worker assigns with the same published snapshot (see `worker/coordination.py`).
`version` counts model generations (1 after seeding); `revision` counts publications.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import cluster, preprocessing
from sklearn.cluster import KMeans as BatchKMeans

from config.settings import ModelSettings
from worker.drift import FitDrift
from worker.features import FEATURES

CHECKPOINT_FORMAT = 2


@dataclass(frozen=True, slots=True)
class Learned:
    """What learning one profile revealed: warm-up just ended (`seeded`), or the fit
    detector fired (`drift_level`, the mean distance it now sees)."""

    seeded: bool = False
    drift_level: float | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    segment: str
    name: str
    distance: float


@dataclass(frozen=True, slots=True)
class Pull:
    """How one feature sways a profile between its segment and the runner-up: `pull` is
    the runner-up's squared distance minus the segment's along this feature (standardized
    units), so the pulls add up to the whole margin and a positive one keeps the profile
    where it is."""

    feature: str
    value: float
    segment_centre: float
    population_mean: float
    pull: float


@dataclass(slots=True)
class Segment:
    id: str
    created_at: int
    name: str = ""
    description: str = ""


class SegmentModel:
    """Scaler + KMeans + warm-up seeding + the registry of stable segment ids."""

    def __init__(self, settings: ModelSettings) -> None:
        self._settings = settings
        self.scaler = preprocessing.StandardScaler()
        self.kmeans = cluster.KMeans(
            n_clusters=settings.n_clusters, halflife=settings.learning_rate, seed=settings.seed
        )
        self.version = 0
        self.revision = 0
        self.segments: dict[int, Segment] = {}
        self._next_id = 1
        self._warmup: dict[str, dict[str, float]] = {}
        self.fit_drift = FitDrift()

    @property
    def ready(self) -> bool:
        return self.version > 0

    def learn_one(self, user_id: str, x: dict[str, float], event_ts: int) -> Learned:
        """Learn from one profile, watching how far it lands from the segment centres."""
        self.scaler.learn_one(x)
        if self.ready:
            z = self.scaler.transform_one(x)
            index = self.kmeans.learn_predict_one(z)
            # River moved that centre toward z by the learning rate, so its distance
            # before the move (what the detector watches) is the distance now, scaled back
            distance = self._distance(z, index) / (1 - self.kmeans.halflife)
            drifted = self.fit_drift.update(distance)
            return Learned(drift_level=self.fit_drift.level if drifted else None)
        self._warmup[user_id] = x
        if len(self._warmup) < self._settings.warmup_users:
            return Learned()
        self._seed(event_ts)
        self._warmup = {}
        return Learned(seeded=True)

    def forget(self, user_id: str) -> None:
        """Drop a deleted user from the warm-up buffer."""
        self._warmup.pop(user_id, None)

    def assign(self, x: dict[str, float]) -> Assignment:
        """The nearest segment to a profile, without learning from it."""
        return self.assign_many([x])[0]

    def assign_many(self, xs: Sequence[dict[str, float]]) -> list[Assignment]:
        """The nearest segment to each profile: one vectorized pass for a whole batch."""
        distances = self._distances(xs)
        segments = [self.segments[index] for index in sorted(self.segments)]
        return [
            Assignment(segments[nearest].id, segments[nearest].name, float(row[nearest]))
            for row, nearest in zip(distances, distances.argmin(axis=1), strict=True)
        ]

    def distances(self, x: dict[str, float]) -> dict[str, float]:
        """Distance (standardized units) from a profile to every segment's centre."""
        row = self._distances([x])[0]
        return {
            self.segments[index].id: float(d)
            for index, d in zip(sorted(self.segments), row, strict=True)
        }

    def explain(self, x: dict[str, float]) -> tuple[Assignment, dict[str, float], list[Pull]]:
        """The assignment, the distance to every segment, and each feature's pull toward
        the assigned segment against the runner-up (strongest first)."""
        distances = self.distances(x)
        (nearest, _), (runner_up, _) = sorted(distances.items(), key=lambda kv: kv[1])[:2]
        index = {seg.id: i for i, seg in self.segments.items()}
        segment = self.segments[index[nearest]]
        assignment = Assignment(nearest, segment.name, distances[nearest])
        z = self.scaler.transform_one(x)
        own = self.kmeans.centers[index[assignment.segment]]
        other = self.kmeans.centers[index[runner_up]]
        centre = self.centroid(index[assignment.segment])
        pulls = [
            Pull(
                name,
                x[name],
                centre[name],
                self.scaler.means[name],
                (z[name] - other[name]) ** 2 - (z[name] - own[name]) ** 2,
            )
            for name in FEATURES
        ]
        return assignment, distances, sorted(pulls, key=lambda p: -p.pull)

    def _distances(self, xs: Sequence[dict[str, float]]) -> np.ndarray:
        """Euclidean distances, (profiles × segments), after River's scaling (a feature
        without variance scales to 0, as in `StandardScaler.transform_one`)."""
        x = np.array([[row[name] for name in FEATURES] for row in xs], dtype=float)
        means = np.array([self.scaler.means[name] for name in FEATURES])
        stds = np.sqrt([self.scaler.vars[name] for name in FEATURES])
        z = np.divide(x - means, stds, out=np.zeros_like(x), where=stds > 0)
        centers = np.array(
            [[self.kmeans.centers[i][name] for name in FEATURES] for i in sorted(self.segments)]
        )
        return np.asarray(np.sqrt(((z[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)))

    def _distance(self, z: dict[str, float], index: int) -> float:
        center = self.kmeans.centers[index]
        return math.sqrt(sum((z[name] - center[name]) ** 2 for name in FEATURES))

    def _seed(self, event_ts: int) -> None:
        points = np.array(
            [
                [z[name] for name in FEATURES]
                for z in map(self.scaler.transform_one, self._warmup.values())
            ]
        )
        batch = BatchKMeans(
            n_clusters=self._settings.n_clusters,
            init="k-means++",
            n_init=4,
            random_state=self._settings.seed,
        ).fit(points)
        for index, center in enumerate(batch.cluster_centers_):
            self.kmeans.centers[index].clear()
            self.kmeans.centers[index].update(zip(FEATURES, map(float, center), strict=True))
            self.segments[index] = Segment(id=f"s{self._next_id}", created_at=event_ts)
            self._next_id += 1
        self.version = 1
        self.rename()

    def centroid(self, index: int) -> dict[str, float]:
        """A segment's centre in original feature units (undoing the scaler)."""
        center = self.kmeans.centers[index]
        return {
            name: self.scaler.means[name] + center[name] * math.sqrt(self.scaler.vars[name])
            for name in FEATURES
        }

    def rename(self) -> None:
        """Re-derive every segment's name and description from its current centroid."""
        for index, segment in self.segments.items():
            segment.name, segment.description = describe(
                self.centroid(index), dict(self.kmeans.centers[index])
            )

    def to_state(self) -> dict[str, Any]:
        """A JSON-safe checkpoint: numbers only, so restoring it cannot run code."""
        return {
            "format": CHECKPOINT_FORMAT,
            "features": list(FEATURES),
            "n_clusters": self._settings.n_clusters,
            "version": self.version,
            "revision": self.revision,
            "next_id": self._next_id,
            "scaler": {
                "counts": dict(self.scaler.counts),
                "means": dict(self.scaler.means),
                "vars": dict(self.scaler.vars),
            },
            "centers": {str(i): dict(c) for i, c in self.kmeans.centers.items()},
            "segments": {
                str(i): {"id": s.id, "created_at": s.created_at} for i, s in self.segments.items()
            },
            "drift": {"fit": self.fit_drift.to_state()},
        }

    @classmethod
    def from_state(cls, settings: ModelSettings, state: dict[str, Any]) -> SegmentModel:
        """Rebuild a model from `to_state()`; ValueError when it does not fit the settings."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}"
            )
        if state.get("features") != list(FEATURES):
            raise ValueError("checkpoint was made with a different feature set")
        if state.get("n_clusters") != settings.n_clusters:
            raise ValueError(
                f"checkpoint has {state.get('n_clusters')} clusters, settings ask for "
                f"{settings.n_clusters} (model.n_clusters)"
            )
        model = cls(settings)
        scaler = state["scaler"]
        model.scaler = preprocessing.StandardScaler._from_state(
            scaler["counts"], scaler["means"], scaler["vars"]
        )
        for index, center in state["centers"].items():
            model.kmeans.centers[int(index)].clear()
            model.kmeans.centers[int(index)].update(center)
        model.segments = {int(i): Segment(**s) for i, s in state["segments"].items()}
        model.version = int(state["version"])
        model.revision = int(state["revision"])
        model._next_id = int(state["next_id"])
        # absent from checkpoints written before detectors were part of the model
        model.fit_drift = FitDrift(history=state.get("drift", {}).get("fit", []))
        if model.ready:
            model.rename()
        return model


def describe(centroid: dict[str, float], z: dict[str, float]) -> tuple[str, str]:
    """Name a segment by what sets its centroid apart from the population.

    `centroid` is in original feature units, `z` in standard deviations from the
    population mean. Each rule that fires offers a phrase scored by how far out the
    centroid is; the name is the three strongest phrases.
    """

    def unlog(name: str) -> float:  # a centre may sit a little below the data's floor
        return max(math.expm1(centroid[name]), 0.0)

    orders = unlog("orders")
    bought = orders >= 0.2
    rules: list[tuple[bool, str, float]] = [
        (not bought, "never bought", 3.0),
        (bought and z["aov"] > 0.6, "big spenders", z["aov"]),
        (bought and z["orders"] > 0.6, "frequent buyers", z["orders"]),
        (bought and z["purchase_recency_days"] > 0.6, "lapsing", z["purchase_recency_days"]),
        (
            bought and z["purchase_recency_days"] < -0.6,
            "recent buyers",
            -z["purchase_recency_days"],
        ),
        (z["price_level"] < -0.6, "bargain hunters", -z["price_level"]),
        (z["price_level"] > 0.6, "premium taste", z["price_level"]),
        (z["search_share"] > 0.6, "searchers", z["search_share"]),
        (z["sessions"] > 0.6, "frequent visitors", z["sessions"]),
        (z["sessions"] < -0.6, "occasional", -z["sessions"]),
        (z["tenure_days"] < -0.6, "new", -z["tenure_days"]),
        (z["view_to_cart"] > 0.6, "cart fillers", z["view_to_cart"]),
        (bought and z["cart_to_purchase"] < -0.6, "cart abandoners", -z["cart_to_purchase"]),
        (not bought and z["events_per_session"] >= -0.6, "browsers", 2.0),
    ]
    phrases = [phrase for fired, phrase, score in sorted(rules, key=lambda r: -r[2]) if fired]
    name = ", ".join(phrases[:3]) or "typical shoppers"
    description = (
        f"~{orders:.1f} recent orders, avg order ${unlog('aov'):.0f}, "
        f"{unlog('sessions'):.1f} sessions, "
        f"items viewed ~${unlog('price_level'):.0f}, "
        f"last purchase {centroid['purchase_recency_days']:.0f} d before last visit, "
        f"active {centroid['tenure_days']:.0f} d"
    )
    return name, description
