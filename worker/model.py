"""River clustering behind stable, named segment ids that adapt to drift.

The model of record is River: a `StandardScaler` learns the population online and a
`KMeans` learns the segment centres online. What River does not do is added here:

* Seeding. River's KMeans starts from random Gaussian centres, which strands centres in
  empty space. Instead the profiles learned first fill the reservoir, a k-means++ seeded
  batch k-means (scikit-learn) is fitted on `warmup_users` of them, and its centres
  become River's starting centres.
* Identity. Consumers of `seg:user:*` need segment ids that keep their meaning, and
  people need names. Each River centre is bound to a stable id (`s1`, `s2`, ...) and
  named from its centroid in original units compared with the population.
* Adaptation. The model keeps a reservoir of the latest profile of each of the last
  `reservoir_size` users it learned from. When a detector (`drift.py`) fires, it waits
  for `adapt_after` more profiles of shoppers' behaviour since the detection (by event
  time, so where the refit falls does not depend on batching), then refits the centres
  on the reservoir; every `refit_days` of event time it refits them too (same k), so
  River's wandering centres are re-anchored. The cadence is event time, not profiles
  learned: how many profiles a day brings depends on the shop's traffic, and a replay
  must refit where the live run did. A refit runs Lloyd's iterations from each id's
  anchor (and from an emerging group's centre), not a fresh k-means++ draw: each
  centre moves to the data around what its id meant, where a redraw lands in another
  local optimum each time, moving users between segments that did not change and
  handing ids to other groups.
  Only a redraw that fits the reservoir `redraw_gain` better (k-means inertia) replaces
  the refined centres, and only while the cold-started shop settles (its first centres
  were seeded on young profiles and may sit in a poor optimum) or in a drift's refit
  that adds no segment (one that adds a segment may split an old group instead, and
  the matching would hand the new id to the split). Once settled, a redraw must also
  keep every id's meaning: each centre the matching pairs with an id must lie nearest
  that id's anchor. A redraw after a large new group arrives spends several centres on
  it, and the matching would hand old ids (cart abandoners, say) to parts of it; one
  after a sale that moves window shoppers next to the big spenders may split them apart
  again without moving any id.
  A refit after a detection, once `settle_days` of event time have passed since
  seeding (before, a cold-started population's profiles are still growing and every
  refit keeps k), may change k: centres closer than `merge_distance` merge; a group
  that emerged adds a segment. It is looked for where the reservoir is much denser than
  the reference (the reservoir at the last refit) was: a k+1 fit started there counts
  if its extra cluster holds at least `new_segment_share` of the reservoir and
  `new_segment_growth` times what it held of the reference, not counting reference
  profiles whose region is empty now (a drift can replace a region's occupants); if
  it lies `merge_distance` from every anchor (a group that shifted is not new); and if
  most of its profiles are not in segments adaptation added less than `settle_days`
  ago (a young group keeps maturing away from where it was first seen). A drift's
  refit that adds none is followed by `growth_looks` looks for such a group, which
  refit only when two in a row find it (a new kind of shopper arrives over hours).
  Every refit once settled also retires an id its group has left: one that held under
  `new_segment_share` of the reservoir when its anchor was set, and whose centre,
  refined from that anchor, would move more than `merge_distance` to other profiles.
  A sale can drain the window shoppers' id to a few per cent, and the new visitors who
  arrive beside it would take it over, giving the id a meaning it never had.
  Refined centres keep the ids of the anchors their iterations started from, and the
  emerging group's centre gets a new id: paired with the anchors by distance after the
  fact, a centre that travelled farther than the gap between two anchors would cross
  ids over, and its users would move. A redraw's centres take the old ids by a
  minimum-total-distance matching (Hungarian, not nearest-first) against each id's
  anchor, its centre at the last refit (River's centres wander as they learn, and one
  dragged toward a new group must not hand its id to that group). An id left without a
  match is retired, never reused.
* Membership. `assign_many` keeps a user in their current segment unless another centre
  is closer by more than `switch_margin` (relative), so boundary users do not flap. Not
  while the model settles (refits may still redraw what ids mean), and a segment
  adaptation added takes users without that margin for `adopt_days`. Once the published
  model has learned past `settled_at` (`settled`), workers place every user afresh, not
  only those whose events come: placed by a settling version, a quiet user may hold an
  id that meant something else then.

Learning and assigning are separate calls so that one worker can train while every
worker assigns with the same published snapshot (see `worker/coordination.py`).
`version` counts model generations (1 after seeding, +1 per adaptation); `revision`
counts publications.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import cluster, preprocessing
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans as BatchKMeans
from sklearn.neighbors import NearestNeighbors

from config.settings import ModelSettings
from schemas.records import SegmentLifecycle
from worker.drift import Detectors, EventSample
from worker.features import FEATURES
from worker.profiles import DAY_MS

CHECKPOINT_FORMAT = 3
NEIGHBOURS, CROWDED = 20, 0.9  # a region is crowded by one set: 18 of 20 neighbours its own


@dataclass(frozen=True, slots=True)
class Learned:
    """What learning one profile revealed: warm-up just ended (`seeded`), detectors that
    fired (`drifts`), or the segments were refitted (`adapted`)."""

    seeded: bool = False
    drifts: tuple[str, ...] = ()
    detail: str = ""  # what the detectors saw, for the log
    adapted: bool = False


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
    """Scaler + KMeans + seeding, adaptation and the registry of stable segment ids."""

    def __init__(self, settings: ModelSettings, first_id: int = 1) -> None:
        self._settings = settings
        self.scaler = preprocessing.StandardScaler()
        self.kmeans = cluster.KMeans(
            n_clusters=settings.n_clusters, halflife=settings.learning_rate, seed=settings.seed
        )
        self.version = 0
        self.revision = 0
        self.segments: dict[int, Segment] = {}
        self._next_id = first_id  # ids are never reused, even by a fresh model
        self.reservoir: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.reference: list[dict[str, float]] = []  # the reservoir at the last (re)fit
        # Each segment's centre as of its last (re)fit, in original units: what its id
        # means. River's centres wander with learning; ids are matched on anchors.
        self.anchors: dict[int, dict[str, float]] = {}
        self.anchor_shares: dict[int, float] = {}  # of the reservoir, when anchors were set
        self.detectors = Detectors(settings)
        self.lifecycle: list[SegmentLifecycle] = []  # not yet published
        self._adapt_in: int | None = None  # learned profiles until a drift's refit
        self._adapt_from = 0  # event time from which learned profiles count toward it
        self._looks = 0  # follow-up looks for an emerging group left after a drift's refit
        self._candidate: dict[str, float] | None = None  # the group the last look found
        self._seeded_at = 0  # event time of the first seeding
        self._refitted_at = 0  # event time of the last seeding or refit
        self.learned_to = 0  # event time of the latest profile learned

    @property
    def ready(self) -> bool:
        return self.version > 0

    def learn_one(self, user_id: str, x: dict[str, float], event_ts: int) -> Learned:
        """Learn from one profile, watching for drift and adapting when it is seen."""
        self.learned_to = max(self.learned_to, event_ts)
        self.scaler.learn_one(x)
        self.reservoir[user_id] = x
        self.reservoir.move_to_end(user_id)
        if len(self.reservoir) > self._settings.reservoir_size:
            self.reservoir.popitem(last=False)
        if not self.ready:
            if len(self.reservoir) < self._settings.warmup_users:
                return Learned()
            self._seed(event_ts)
            return Learned(seeded=True)
        z = self.scaler.transform_one(x)
        index = self.kmeans.learn_predict_one(z)
        # River moved that centre toward z by the learning rate, so its distance
        # before the move (what the detector watches) is the distance now, scaled back
        distance = self._distance(z, index) / (1 - self.kmeans.halflife)
        drifts = tuple(self.detectors.update(z, index, distance))
        self._drifted(drifts, event_ts)
        detail = "; ".join(self.detectors.describe(detector) for detector in drifts)
        if self._adapt_in is not None and event_ts >= self._adapt_from:
            self._adapt_in -= 1
        drifted = self._adapt_in == 0
        due = (
            self._settings.adaptation
            and event_ts - self._refitted_at >= self._settings.refit_days * DAY_MS
        )
        adapted = (drifted or due) and self.adapt(event_ts, grow=drifted)
        return Learned(drifts=drifts, detail=detail, adapted=adapted)

    def observe(self, sample: EventSample, event_ts: int) -> bool:
        """Watch one sample of the event mix, whose last event is at `event_ts` (the
        `events` detector); True when it revealed drift."""
        if not self.ready or not self.detectors.observe(sample):
            return False
        self._drifted(("events",), event_ts)
        return True

    def _drifted(self, detectors: tuple[str, ...], event_ts: int) -> None:
        """Record detections for `segment-lifecycle` and schedule a refit (unless one is
        scheduled already, or adaptation is off)."""
        for detector in detectors:
            self.lifecycle.append(self._event("drift_detected", event_ts, detector=detector))
        if detectors and self._adapt_in is None and self._settings.adaptation:
            self._adapt_in, self._adapt_from = self._settings.adapt_after, event_ts

    def ids_ever(self) -> set[str]:
        """Every id this model's line has given out, live or retired (ids are numbered)."""
        return {f"s{n}" for n in range(1, self._next_id)}

    def forget(self, user_id: str) -> None:
        """Drop a deleted user's profile from the reservoir."""
        self.reservoir.pop(user_id, None)

    def assign(
        self, x: dict[str, float], current: str | None = None, at: int | None = None
    ) -> Assignment:
        """The segment for a profile, without learning from it."""
        return self.assign_many([x], [current], None if at is None else [at])[0]

    def assign_many(
        self,
        xs: Sequence[dict[str, float]],
        current: Sequence[str | None] | None = None,
        at: Sequence[int] | None = None,
    ) -> list[Assignment]:
        """The segment of each profile, in one vectorized pass: the nearest one, unless
        the user's `current` segment is within `switch_margin` of it. Without the margin
        (by the profile's event time, `at`): while the model settles, when refits may
        still redraw what the ids mean and a margin would hold users to an id's old
        meaning; and into a segment adaptation added less than `adopt_days` before, since
        the shoppers it was made for had been placed elsewhere before it existed. Leaving
        that segment needs the margin, so this cannot flap."""
        distances = self._distances(xs)
        segments = [self.segments[index] for index in sorted(self.segments)]
        nearest = distances.argmin(axis=1)
        if current is not None:
            column = {seg.id: i for i, seg in enumerate(segments)}
            stay = np.array(
                [column.get(s, -1) if s is not None else -1 for s in current], dtype=int
            )
            rows = np.arange(len(nearest))
            best = distances[rows, nearest]
            keep = (stay >= 0) & (
                distances[rows, np.maximum(stay, 0)] <= best * (1 + self._settings.switch_margin)
            )
            if at is not None:  # not while settling, nor into a segment still adopting
                keep &= np.asarray(at) >= self._marginless_until(segments)[nearest]
            nearest = np.where(keep, stay, nearest)
        return [
            Assignment(segments[i].id, segments[i].name, float(row[i]))
            for row, i in zip(distances, nearest, strict=True)
        ]

    def _marginless_until(self, segments: list[Segment]) -> np.ndarray:
        """Per segment, the event time until which it takes users without the margin:
        until the model settled (`settle_days` after seeding), and for `adopt_days` after
        adaptation added it (a seeded segment was not added)."""
        window = self._settings.adopt_days * DAY_MS
        added = [s.created_at + window if s.created_at > self._seeded_at else 0 for s in segments]
        return np.asarray(np.maximum(np.array(added, dtype=float), self.settled_at))

    @property
    def settled_at(self) -> float:
        """Event time from which the cold-started model counts as settled."""
        return self._seeded_at + self._settings.settle_days * DAY_MS

    @property
    def settled(self) -> bool:
        """Whether this model has learned past its settling time. The stream passing it
        is not enough: a published copy can be days of event time older than the trained
        model on a backlog, and one from before settling may give an id another meaning."""
        return self.ready and self.learned_to >= self.settled_at

    def distances(self, x: dict[str, float]) -> dict[str, float]:
        """Distance (standardized units) from a profile to every segment's centre."""
        row = self._distances([x])[0]
        return {
            self.segments[index].id: float(d)
            for index, d in zip(sorted(self.segments), row, strict=True)
        }

    def explain(self, x: dict[str, float]) -> tuple[Assignment, dict[str, float], list[Pull]]:
        """The nearest segment, the distance to every segment, and each feature's pull
        toward it against the runner-up (strongest first)."""
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

    def _standardized(self, xs: Sequence[dict[str, float]]) -> np.ndarray:
        """Profiles as rows after River's scaling (a feature without variance scales to
        0, as in `StandardScaler.transform_one`)."""
        x = np.array([[row[name] for name in FEATURES] for row in xs], dtype=float)
        means = np.array([self.scaler.means[name] for name in FEATURES])
        stds = np.sqrt([self.scaler.vars[name] for name in FEATURES])
        return np.asarray(np.divide(x - means, stds, out=np.zeros_like(x), where=stds > 0))

    def _centres(self) -> np.ndarray:
        """The centres as rows, in the order of `sorted(self.segments)`."""
        return np.array(
            [[self.kmeans.centers[i][name] for name in FEATURES] for i in sorted(self.segments)]
        )

    def _distances(self, xs: Sequence[dict[str, float]]) -> np.ndarray:
        """Euclidean distances, (profiles × segments), in standardized units."""
        return pairwise(self._standardized(xs), self._centres())

    def _distance(self, z: dict[str, float], index: int) -> float:
        center = self.kmeans.centers[index]
        return math.sqrt(sum((z[name] - center[name]) ** 2 for name in FEATURES))

    def _fit(self, points: np.ndarray, k: int) -> BatchKMeans:
        return BatchKMeans(
            n_clusters=k, init="k-means++", n_init=4, random_state=self._settings.seed
        ).fit(points)

    def _refine(self, points: np.ndarray, start: np.ndarray) -> BatchKMeans:
        """Lloyd's iterations on `points` from the centres `start`: a refit that moves each
        centre to the data around it. Redrawn from scratch (k-means++), a refit lands in
        another local optimum each time and moves users between segments that did not
        change; so a redraw replaces it only when it fits clearly better (`redraw_gain`)."""
        return BatchKMeans(n_clusters=len(start), init=start, n_init=1).fit(points)

    def _seed(self, event_ts: int) -> None:
        points = self._standardized(list(self.reservoir.values()))
        fit = self._fit(points, self._settings.n_clusters)
        self.version, self._seeded_at, self._refitted_at = 1, event_ts, event_ts
        self.reference = list(self.reservoir.values())
        self._bind({}, fit.cluster_centers_, points, event_ts)
        self.rename()

    def adapt(self, event_ts: int, grow: bool = True) -> bool:
        """Refit the centres on the reservoir (merge, add unless not `grow`, re-seed) and
        carry the ids over; False when it was a follow-up look that found nothing new.

        A drift's refit that adds no segment is followed by `growth_looks` looks, every
        `adapt_after` profiles, against the reservoir from before the drift: a new kind
        of shopper arrives over hours, and may be too few to count at the first refit. A
        look refits only when it finds the group the look before it found too."""
        looking = grow and self._looks > 0
        points = self._standardized(list(self.reservoir.values()))
        previous = dict(self.segments)
        order = sorted(previous)
        settled = event_ts >= self.settled_at
        merged = self._converged(dict(zip(order, self._centres(), strict=True))) if settled else {}
        anchors = self._standardized([self.anchors[i] for i in order])
        old = dict(zip(order, anchors, strict=True))
        survivors = {i: c for i, c in old.items() if i not in merged}
        deserted = self._deserted(points, survivors) if settled else set()
        survivors = {i: c for i, c in survivors.items() if i not in deserted}
        can_grow = grow and settled and len(survivors) < self._settings.max_clusters
        emerging = self._emerging(points, survivors, event_ts) if can_grow else None
        if looking:
            persists = emerging is not None and self._persists(emerging)
            self._candidate = None if emerging is None else self._original(emerging)
            if not persists:
                self._looks -= 1
                self._adapt_in = self._settings.adapt_after if self._looks else None
                self._adapt_from = event_ts
                return False
        start = [*survivors.values(), *([emerging] if emerging is not None else [])]
        fit = self._refine(points, np.array(start))
        # Lloyd's from each id's anchor: the n-th centre is the n-th survivor's, moved to
        # its data, and an emerging group's is last.
        pairs = dict(enumerate(survivors))
        # A drift's refit, or a cold start's profiles maturing, may redraw; not a refit
        # that adds a group: a redraw there may split an old group instead, and the
        # matching would hand the new id to that split.
        if (grow and emerging is None) or not settled:
            redrawn = self._fit(points, len(start))
            better = redrawn.inertia_ < (1 - self._settings.redraw_gain) * fit.inertia_
            if better and (not settled or keeps_meaning(survivors, redrawn.cluster_centers_)):
                fit, pairs = redrawn, matched(survivors, redrawn.cluster_centers_)
        follow_up = can_grow and emerging is None and not looking
        self.version += 1
        if not follow_up:  # else the looks compare against the reservoir before the drift
            self.reference = list(self.reservoir.values())
        kept = self._bind(pairs, fit.cluster_centers_, points, event_ts)
        for index, segment in previous.items():
            if index in kept:
                continue
            into = merged.get(index)
            if into in kept:
                self.lifecycle.append(
                    self._event("merged", event_ts, segment=segment.id, into=previous[into].id)
                )
            else:
                self.lifecycle.append(self._event("retired", event_ts, segment=segment.id))
        self.rename()
        self.detectors.segments_changed()
        self._looks = self._settings.growth_looks if follow_up else 0
        self._adapt_in = self._settings.adapt_after if self._looks else None
        self._adapt_from = self._refitted_at = event_ts
        self._candidate = None
        return True

    def _persists(self, emerging: np.ndarray) -> bool:
        """Whether the previous look found the same group (its centre within
        `merge_distance`, both scaled as now: the newcomers move the scaler too): a group
        still arriving is found look after look, where a chance split of k+1 k-means
        lands somewhere else each time."""
        if self._candidate is None:
            return False
        previous = self._standardized([self._candidate])[0]
        return bool(np.linalg.norm(emerging - previous) < self._settings.merge_distance)

    def _original(self, centre: np.ndarray) -> dict[str, float]:
        """A standardized centre in original units."""
        return {
            name: self.scaler.means[name] + float(value) * math.sqrt(self.scaler.vars[name])
            for name, value in zip(FEATURES, centre, strict=True)
        }

    def _converged(self, old: dict[int, np.ndarray]) -> dict[int, int]:
        """Centres closer than `merge_distance` to an older one: {absorbed: into}."""
        merged: dict[int, int] = {}
        by_age = sorted(old, key=lambda i: (self.segments[i].created_at, i))
        for n, younger in enumerate(by_age):
            for older in by_age[:n]:
                if older in merged:
                    continue
                if np.linalg.norm(old[younger] - old[older]) < self._settings.merge_distance:
                    merged[younger] = older
                    break
        return merged

    def _deserted(self, points: np.ndarray, survivors: dict[int, np.ndarray]) -> set[int]:
        """Ids their group has left: they held under `new_segment_share` of the reservoir
        when their anchors were set, and refined, their centre is pulled over
        `merge_distance` from the anchor, to other profiles. Kept, such an id would come
        to mean those (a sale drains the window shoppers' id, and the new visitors who
        then arrive beside it would take it over); retired, they are found as a new group
        if they are one (`_emerging`). A small group that stays keeps its id."""
        anchors = np.array(list(survivors.values()))
        shares = np.array([self.anchor_shares.get(i, 1.0) for i in survivors])
        drained = shares < self._settings.new_segment_share
        if not drained.any() or len(anchors) - drained.sum() < 2:
            return set()
        refined = self._refine(points, anchors).cluster_centers_
        moved = np.linalg.norm(refined - anchors, axis=1) > self._settings.merge_distance
        return {i for i, gone in zip(survivors, drained & moved, strict=True) if gone}

    def _emerging(
        self, points: np.ndarray, survivors: dict[int, np.ndarray], event_ts: int
    ) -> np.ndarray | None:
        """The centre of a group that emerged since the reference was taken, if any.

        Where it is, the reservoir is now much denser than the reference was (`crowding`):
        a k+1 fit starts from the survivors' anchors plus the mean of the profiles there.
        Its extra cluster counts if it holds at least `new_segment_share` of the
        reservoir, and `new_segment_growth` times the share of the reference that falls
        in it, counting only reference profiles whose region is not vacated now. A drift
        can replace a region's occupants (at a sale the lapsing customers buy more and
        leave the region the buying window shoppers move into): counted, the leavers
        would make the newcomers look like an old group that merely grew. It must lie
        `merge_distance` from every anchor: a group that shifted a little (lapsing
        customers ageing) leaves a vacated region for a crowded one too, but it would
        merge back at the next refit. And most of its profiles must not be in segments
        adaptation added less than `settle_days` ago: a young group keeps maturing away
        from where it was first seen, and would be split off again and again.
        """
        reference = self._standardized(self.reference)
        crowded, vacated = crowding(points, reference)
        if not crowded.any():
            return None
        start = np.array([*survivors.values(), points[crowded].mean(axis=0)])
        wider = self._refine(points, start)
        extra = len(start) - 1
        now = float(np.mean(wider.labels_ == extra))
        kept = reference[~vacated]
        before = float(np.mean(wider.predict(kept) == extra)) if len(kept) else 0.0
        if not (self._settings.new_segment_share <= now < 1.0):
            return None
        if now < self._settings.new_segment_growth * before:
            return None
        centre: np.ndarray = wider.cluster_centers_[extra]
        apart = pairwise(centre[None, :], np.array(list(survivors.values())))[0]
        if apart.min() < self._settings.merge_distance:
            return None
        young_until = event_ts - self._settings.settle_days * DAY_MS
        young = np.array(
            [
                self.segments[i].created_at > max(self._seeded_at, young_until)
                for i in sorted(self.segments)
            ]
        )
        members = points[wider.labels_ == extra]
        if young[pairwise(members, self._centres()).argmin(axis=1)].mean() > 0.5:
            return None
        return centre

    def _bind(
        self, pairs: dict[int, int], centres: np.ndarray, points: np.ndarray, event_ts: int
    ) -> set[int]:
        """Install `centres` as River's. Each row of `centres` in `pairs` keeps the id of
        the segment it is paired with (row -> old index); one left over (an emerging
        group's) gets a new id. Each anchor keeps its share of `points`, the standardized
        reservoir it was fitted on. Returns the old indices kept."""
        previous, self.segments, self.kmeans.centers, self.anchors = self.segments, {}, {}, {}
        fresh = max(previous, default=-1) + 1
        nearest = pairwise(points, centres).argmin(axis=1)
        shares = np.bincount(nearest, minlength=len(centres)) / len(points)
        self.anchor_shares = {}
        for row, centre in enumerate(centres):
            if row in pairs:
                index = pairs[row]
                self.segments[index] = previous[index]
            else:
                index, fresh = fresh, fresh + 1
                self.segments[index] = Segment(id=f"s{self._next_id}", created_at=event_ts)
                self._next_id += 1
                self.lifecycle.append(
                    self._event("created", event_ts, segment=f"s{self._next_id - 1}")
                )
            self.anchors[index] = self._original(centre)
            self.anchor_shares[index] = float(shares[row])
            self.kmeans.centers[index] = defaultdict(
                float, zip(FEATURES, map(float, centre), strict=True)
            )
        return set(pairs.values())

    def _event(self, event: str, event_ts: int, **fields: str | None) -> SegmentLifecycle:
        return SegmentLifecycle(
            event=event, model_version=self.version, timestamp=event_ts, **fields
        )

    def shift_from(self, other: SegmentModel) -> dict[str, float]:
        """How far each segment's centre moved since `other` (standardized units)."""
        before = {seg.id: other.kmeans.centers[i] for i, seg in other.segments.items()}
        return {
            seg.id: math.sqrt(
                sum((self.kmeans.centers[i][n] - before[seg.id][n]) ** 2 for n in FEATURES)
            )
            for i, seg in self.segments.items()
            if seg.id in before
        }

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
            "anchors": {str(i): a for i, a in self.anchors.items()},
            "anchor_shares": {str(i): share for i, share in self.anchor_shares.items()},
            "reference": rows(self.reference),
            "reservoir": rows(list(self.reservoir.values())),
            "adapt_in": self._adapt_in,
            "adapt_from": self._adapt_from,
            "looks": self._looks,
            "refitted_at": self._refitted_at,
            "seeded_at": self._seeded_at,
            "learned_to": self.learned_to,
            "psi": self.detectors.shares.psi,
        }

    @classmethod
    def from_state(
        cls, settings: ModelSettings, state: dict[str, Any], learning: bool = True
    ) -> SegmentModel:
        """Rebuild a model from `to_state()`; ValueError when it does not fit the settings.

        A model that will learn (`learning`) gets the reservoir and reference back, and
        its detectors are rebuilt by replaying the reservoir through them. A copy that
        only assigns needs none of that, and rebuilding it was most of the cost of
        adopting a publication (about 25 of 27 ms)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}"
            )
        if state.get("features") != list(FEATURES):
            raise ValueError("checkpoint was made with a different feature set")
        if len(state["centers"]) > settings.max_clusters:
            raise ValueError(
                f"checkpoint has {len(state['centers'])} segments, more than "
                f"model.max_clusters ({settings.max_clusters})"
            )
        model = cls(settings)
        scaler = state["scaler"]
        model.scaler = preprocessing.StandardScaler._from_state(
            scaler["counts"], scaler["means"], scaler["vars"]
        )
        model.kmeans.centers = {
            int(i): defaultdict(float, center) for i, center in state["centers"].items()
        }
        model.segments = {int(i): Segment(**s) for i, s in state["segments"].items()}
        model.anchors = {int(i): a for i, a in state["anchors"].items()}
        # absent before 2026-12-04: no id counts as drained until its next refit
        model.anchor_shares = {int(i): float(v) for i, v in state.get("anchor_shares", {}).items()}
        model.version = int(state["version"])
        model.revision = int(state["revision"])
        model._next_id = int(state["next_id"])
        model._adapt_in = state["adapt_in"]
        model._adapt_from = int(state.get("adapt_from", 0))  # absent before 2026-12-02
        model._looks = int(state.get("looks", 0))  # absent from checkpoints before the looks
        model._seeded_at = int(state["seeded_at"])
        # absent from checkpoints made before the cadence was event time: one refit soon
        model._refitted_at = int(state.get("refitted_at", model._seeded_at))
        model.learned_to = int(state.get("learned_to", model._refitted_at))  # absent before it
        if model.ready:
            model.rename()
        if learning:
            model._resume_learning(state)
        model.detectors.shares.psi = float(state["psi"])
        return model

    def _resume_learning(self, state: dict[str, Any]) -> None:
        """A checkpoint's reservoir and reference, and detectors primed by replaying the
        reservoir through them: what refits and drift detection work from."""
        reservoir, self.reference = (
            [dict(zip(FEATURES, map(float, row), strict=True)) for row in state[key]]
            for key in ("reservoir", "reference")
        )
        self.reservoir = OrderedDict((f"restored-{n}", x) for n, x in enumerate(reservoir))
        if self.ready:
            self._replay(reservoir)

    def _replay(self, xs: list[dict[str, float]]) -> None:
        """Feed profiles through the detectors without learning (their alarms dropped)."""
        if not xs:
            return
        distances = self._distances(xs)
        order = sorted(self.segments)
        for x, row in zip(xs, distances, strict=True):
            nearest = int(row.argmin())
            self.detectors.update(self.scaler.transform_one(x), order[nearest], float(row[nearest]))


def match(old: np.ndarray, new: np.ndarray) -> dict[int, int]:
    """{row of `new`: row of `old`} pairing old and new centres with the least total
    distance (Hungarian); with more new centres than old, the extra ones stay unpaired."""
    rows, cols = linear_sum_assignment(pairwise(old, new))
    return {int(c): int(r) for r, c in zip(rows, cols, strict=True)}


def matched(old: dict[int, np.ndarray], centres: np.ndarray) -> dict[int, int]:
    """{row of `centres`: index of the `old` centre the matching pairs it with}."""
    indices = list(old)
    return {row: indices[o] for row, o in match(np.array(list(old.values())), centres).items()}


def keeps_meaning(old: dict[int, np.ndarray], centres: np.ndarray) -> bool:
    """Whether every centre the matching pairs with an old one is nearest that old one."""
    anchors = np.array(list(old.values()))
    nearest = pairwise(centres, anchors).argmin(axis=1)
    return all(nearest[row] == o for row, o in match(anchors, centres).items())


def rows(xs: list[dict[str, float]]) -> list[list[float]]:
    """Profiles as rows of features rounded to 6 decimals, for a checkpoint."""
    table = np.array([[x[name] for name in FEATURES] for x in xs], dtype=float).reshape(
        -1, len(FEATURES)
    )
    return list(np.round(table, 6).tolist())


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of `a` and the rows of `b`."""
    return np.asarray(np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)))


def crowding(now: np.ndarray, then: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of `now` lie where `now` is much denser than `then` was, and which
    rows of `then` lie where it is much sparser: at least `CROWDED` of a row's
    `NEIGHBOURS` nearest rows, among both sets, come from its own set (both hold at
    least `warmup_users`, so a small model has fewer neighbours to ask)."""
    both = np.vstack([now, then])
    k = min(NEIGHBOURS, len(both) - 1)
    # Brute force: at 11 features a tree prunes little, and over two 2,000-row sets it
    # took 3-4 times as long (0.26 s against 0.08 here), all of it on the event's path.
    search = NearestNeighbors(n_neighbors=k + 1, algorithm="brute")
    _, nearest = search.fit(both).kneighbors(both)
    from_now = (nearest[:, 1:] < len(now)).mean(axis=1)
    return from_now[: len(now)] >= CROWDED, from_now[len(now) :] <= 1 - CROWDED


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
    # Without purchases, recency sits at its cap (`profile.recency_cap_days`): no purchase
    # to date, not a purchase that long ago.
    buying = (
        f"~{orders:.1f} recent orders, avg order ${unlog('aov'):.0f}, "
        f"last purchase {centroid['purchase_recency_days']:.0f} d before last visit"
        if bought
        else "no recent orders"
    )
    description = (
        f"{buying}, {unlog('sessions'):.1f} sessions, "
        f"items viewed ~${unlog('price_level'):.0f}, active {centroid['tenure_days']:.0f} d"
    )
    return name, description
