"""Drift detection: notice when the segments stop fitting the shoppers.

The signal is the distance from each profile the model learns from to its nearest
segment centre. When behaviour moves (a sale, a new kind of visitor), profiles land
further from every centre and the mean distance shifts. River's ADWIN watches that
stream: it keeps an adaptive window and reports when the older and newer parts of it
differ in mean beyond what chance explains (delta = false-alarm bound), with no
threshold to hand-tune per shop.

The detector belongs to the model the leader trains (`model.py`), so the group counts a
drift once, not once per worker, and it travels with the model's checkpoint: its recent
input is stored as plain numbers and replayed into a fresh ADWIN on restore, so a
restarted or new leader neither loses the reference nor unpickles anything from Redis.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

from river import drift

from worker.metrics import Metrics

log = logging.getLogger(__name__)

DETECTORS = ("fit",)


class FitDrift:
    """ADWIN over the distances of learned profiles to their nearest centre, restorable
    from its last `HISTORY` inputs."""

    HISTORY = 2000

    def __init__(self, delta: float = 0.002, history: Iterable[float] = ()) -> None:
        self._adwin = drift.ADWIN(delta=delta)
        self._recent: deque[float] = deque(maxlen=self.HISTORY)
        for distance in history:
            self.update(float(distance))

    @property
    def level(self) -> float:
        """The mean distance over ADWIN's current window."""
        return float(self._adwin.estimation)

    def update(self, distance: float) -> bool:
        """Feed one distance; True when it revealed drift."""
        self._recent.append(distance)
        self._adwin.update(distance)
        return bool(self._adwin.drift_detected)

    def to_state(self) -> list[float]:
        return [round(d, 6) for d in self._recent]


class DriftReport:
    """Counts detections and logs them, at most a line a minute."""

    LOG_EVERY_S = 60.0

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._unlogged = 0
        self._logged_at = -self.LOG_EVERY_S
        for detector in DETECTORS:
            metrics.drift.labels(detector)

    def __call__(self, detector: str, level: float, event_ts: int) -> None:
        self._metrics.drift.labels(detector).inc()
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY_S:
            log.info(
                "drift (%s): %d detection(s); mean distance to segment centres now %.2f "
                "(event time %d)",
                detector,
                self._unlogged,
                level,
                event_ts,
            )
            self._unlogged, self._logged_at = 0, now
