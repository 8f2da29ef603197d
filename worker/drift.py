"""Drift detection: notice when the shoppers move away from what the segments describe.

Four detectors, each watching a signal that a different kind of drift moves, all owned
by the model the leader trains (`model.py`), so the group counts a drift once, not once
per worker:

* `fit` — River's ADWIN over the distance from each profile to its nearest centre. When
  behaviour moves somewhere no segment covers (a new kind of visitor), profiles land
  further from every centre. Only a rise counts: a fall means the segments fit better.
* `feature` — one ADWIN per rate-like feature (`features.RATES`) on the standardized
  stream. A sale turns browsers into buyers: conversion and order value move even while
  every profile still lands near some centre. Count-like features (sessions, orders,
  tenure, recency) are not watched one by one: they grow as profiles mature, so after
  a cold start they would report the population ageing, not a change in behaviour.
* `events` — Page-Hinkley on each share of the event mix (purchases, add-to-carts,
  searches) and on the mean log price of the items viewed, over consecutive samples of
  `EVENTS_PER_SAMPLE` applied events of one worker, in event time (`InEventTime`,
  `EventMix`; the others hand theirs to the leader), standardized: a profile is learned
  once per user per batch, about one per ten events, and moves only as far as one event
  moves it, so a sale shows in the events long before it shows in the profiles. Events
  are averaged first because consecutive events are not independent (a session's events
  share its shopper's price level); Page-Hinkley rather than ADWIN because the change to
  catch is abrupt and ADWIN needs five samples on each side of a cut before it may
  report. Not restored with the model: they refill within seconds of events.
* `share` — the population stability index (PSI) of the segment shares in the latest
  window of profiles against a reference window taken after the last (re)seeding:
  Σ (p − q)·ln(p / q). Shoppers flowing from one segment into another move it.

ADWIN keeps an adaptive window and reports when its older and newer parts differ in
mean beyond what chance explains (delta bounds the false-alarm rate); Page-Hinkley sums
the standardized excess over the mean (less a slack of `EVENT_SLACK`) and reports when the sum
passes `event_drift_threshold`; PSI's conventional reading (< 0.1 stable, > 0.25 a
major shift) gives its threshold. Detectors are not checkpointed as such: the model stores its
reservoir of recent profiles, and a restored model replays it through fresh detectors
(plain numbers from Redis, nothing unpickled).
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from operator import attrgetter, itemgetter

from river import drift, stats

from config.settings import ModelSettings
from schemas.events import ClickEvent, PurchaseEvent
from worker.features import RATES
from worker.metrics import Metrics

log = logging.getLogger(__name__)

DETECTORS = ("fit", "feature", "share", "events")
SHARES_OF_EVENTS = ("purchase", "add_to_cart", "search")
EVENT_SIGNALS = {  # what the `events` detector watches, by name in the log
    "purchase": "purchase share of events",
    "add_to_cart": "add-to-cart share of events",
    "search": "search share of events",
    "price": "price of items viewed",
}
EVENTS_PER_SAMPLE = 200  # events averaged into one sample of the `events` detector
EventSample = dict[str, float]  # by name in EVENT_SIGNALS (price only when items were viewed)
# Half the smallest shift worth catching, in standard deviations of a sample (a sale moves
# the purchase share by about three): the usual CUSUM choice, quickest for that shift.
EVENT_SLACK = 1.5


def psi(reference: Counter[int], current: Counter[int]) -> float:
    """Population stability index between two histograms over the same bins."""
    ref_total, cur_total = sum(reference.values()), sum(current.values())
    index = 0.0
    for segment in reference.keys() | current.keys():
        p = max(current[segment] / cur_total, 1e-4)
        q = max(reference[segment] / ref_total, 1e-4)
        index += (p - q) * math.log(p / q)
    return index


class ShareShift:
    """PSI of segment shares over consecutive windows against the first one."""

    def __init__(self, window: int, threshold: float) -> None:
        self._window = window
        self._threshold = threshold
        self._reference: Counter[int] | None = None
        self._current: Counter[int] = Counter()
        self.psi = 0.0

    def update(self, segment: int) -> bool:
        self._current[segment] += 1
        if self._current.total() < self._window:
            return False
        window, self._current = self._current, Counter()
        if self._reference is None:
            self._reference = window
            return False
        self.psi = psi(self._reference, window)
        return self.psi > self._threshold

    def reset(self) -> None:
        """Take the next window as the reference (the segments just changed)."""
        self._reference, self._current, self.psi = None, Counter(), 0.0


class EventMix:
    """Consecutive applied events, counted into samples of the `events` detector. Every
    worker counts its own events; the trainer's detector takes each worker's samples
    (`coordination.py`), so it watches every event of the group, however many workers
    share them."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._log_prices = 0.0

    def add(self, event: ClickEvent | PurchaseEvent) -> EventSample | None:
        """Count one event; every `EVENTS_PER_SAMPLE`, the sample they make: the share of
        each of `SHARES_OF_EVENTS`, and the mean log price of the items viewed."""
        counts = self._counts
        counts[event.event_type] += 1
        if isinstance(event, ClickEvent) and event.price:
            counts["priced"] += 1
            self._log_prices += math.log1p(event.price)
        counts["events"] += 1
        if counts["events"] < EVENTS_PER_SAMPLE:
            return None
        sample = {name: counts[name] / counts["events"] for name in SHARES_OF_EVENTS}
        if counts["priced"]:
            sample["price"] = self._log_prices / counts["priced"]
        self._counts, self._log_prices = Counter(), 0.0
        return sample


class InEventTime:
    """Applied events, handed on to the event mix in event time once no earlier one can
    still come from Kafka: once every partition that delivered lately has been fetched
    past the Kafka timestamp of their record (`KafkaSource.fetched_to`).

    Why: a worker that keeps up hands each partition's records on as they come, and one
    partition may run behind the others (a slow producer, fetches out of phase). In a
    benchmark stage paced at 9,000 events/s one of four click partitions ran about 260 ms
    behind; the purchases that waited for its clicks (`EventTimeAligner`) then came in
    lumps, up to 49 in a sample of 200 after a dozen samples with none, and the `events`
    detector fired on them five times in 360,000 events of a shop that did not change.
    Sorting a batch is not enough: the lumps span batches. What waits here is the
    detector's view only; profiles and segments are written with their batch. At most
    `at_most` events wait: past that, the oldest go on regardless."""

    def __init__(self, at_most: int = 20_000) -> None:
        self._at_most = at_most
        self._held: list[tuple[float, ClickEvent | PurchaseEvent]] = []

    def __call__(
        self, applied: Iterable[tuple[float, ClickEvent | PurchaseEvent]], fetched_to: float
    ) -> list[ClickEvent | PurchaseEvent]:
        """Add the batch's `applied` events (each with its record's Kafka timestamp, s);
        the events that may go on now, in event time."""
        held = self._held
        held.extend(applied)
        held.sort(key=itemgetter(0))  # by Kafka timestamp (a stable sort: ties keep order)
        cut = max(bisect_right(held, fetched_to, key=itemgetter(0)), len(held) - self._at_most)
        going, self._held = held[:cut], held[cut:]
        return sorted((event for _, event in going), key=attrgetter("timestamp"))


class Detectors:
    """The detectors over the stream of learned profiles, and over the event mix."""

    def __init__(self, settings: ModelSettings) -> None:
        self._fit = drift.ADWIN(delta=settings.fit_drift_delta)
        self._features = {name: drift.ADWIN(delta=settings.feature_drift_delta) for name in RATES}
        self.shares = ShareShift(settings.psi_window, settings.psi_threshold)
        self._events = {
            name: drift.PageHinkley(
                min_instances=30,
                delta=EVENT_SLACK,
                threshold=settings.event_drift_threshold,
                mode="both",
            )
            for name in EVENT_SIGNALS
        }
        self._event_stats = {name: stats.Var() for name in EVENT_SIGNALS}
        self.moved: list[str] = []  # the features whose detector fired last

    def observe(self, sample: EventSample) -> bool:
        """Feed one sample of the event mix (`EventMix`) to its detectors; True when one
        of them fired."""
        moved = []
        for name, value in sample.items():
            seen = self._event_stats[name]  # standardized against all samples so far
            z = (value - seen.mean.get()) / math.sqrt(seen.get()) if seen.get() > 0 else 0.0
            seen.update(value)
            detector = self._events[name]
            detector.update(z)
            if detector.drift_detected:
                moved.append(EVENT_SIGNALS[name])
        if moved:
            self.moved = moved
        return bool(moved)

    @property
    def fit_level(self) -> float:
        """The mean distance to the nearest centre over the fit detector's window."""
        return float(self._fit.estimation)

    def update(self, z: dict[str, float], segment: int, distance: float) -> list[str]:
        """Feed one learned profile (standardized); the detectors that fired."""
        fired = []
        before = self._fit.estimation
        self._fit.update(distance)
        if self._fit.drift_detected and self._fit.estimation > before:
            fired.append("fit")
        moved = []
        for name, detector in self._features.items():
            detector.update(z[name])
            if detector.drift_detected:
                moved.append(name)
        if moved:
            self.moved = moved
            fired.append("feature")
        if self.shares.update(segment):
            fired.append("share")
        return fired

    def describe(self, detector: str) -> str:
        """What the detector saw, for the log."""
        if detector == "fit":
            return f"mean distance to segment centres now {self.fit_level:.2f}"
        if detector in ("feature", "events"):
            return "moved: " + ", ".join(self.moved)
        return f"segment shares PSI {self.shares.psi:.3f}"

    def segments_changed(self) -> None:
        """The centres were refitted: distances and shares start a new reference."""
        self._fit = drift.ADWIN(delta=self._fit.delta)
        self.shares.reset()


class DriftReport:
    """Counts detections and logs them, at most a line a minute per detector."""

    LOG_EVERY_S = 60.0

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._unlogged: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}
        for detector in DETECTORS:
            metrics.drift.labels(detector)

    def __call__(self, detector: str, detail: str, event_ts: int) -> None:
        self._metrics.drift.labels(detector).inc()
        self._unlogged[detector] += 1
        now = time.monotonic()
        if now - self._logged_at.get(detector, -self.LOG_EVERY_S) >= self.LOG_EVERY_S:
            log.info(
                "drift (%s): %d detection(s); %s (event time %d)",
                detector,
                self._unlogged[detector],
                detail,
                event_ts,
            )
            self._unlogged[detector], self._logged_at[detector] = 0, now
