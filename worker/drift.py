"""Drift detection: notice when the segments stop fitting the shoppers.

The signal is the distance from each assigned profile to its segment's centre. When
behaviour moves (a sale, a new kind of visitor), profiles land further from every centre
and the mean distance shifts. River's ADWIN watches that stream: it keeps an adaptive
window and reports when the older and newer parts of it differ in mean beyond what
chance explains (delta = false-alarm bound), with no threshold to hand-tune per shop.
"""

from __future__ import annotations

import logging
import time

from river import drift

from worker.metrics import Metrics

log = logging.getLogger(__name__)

DETECTORS = ("fit",)


class DriftMonitor:
    LOG_EVERY_S = 60.0

    def __init__(self, metrics: Metrics, delta: float = 0.002) -> None:
        self._metrics = metrics
        self._fit = drift.ADWIN(delta=delta)
        self._unlogged = 0
        self._logged_at = -self.LOG_EVERY_S
        for detector in DETECTORS:
            metrics.drift.labels(detector)

    def update(self, distance: float, event_ts: int) -> bool:
        """Feed one assignment distance; True when this observation revealed drift."""
        self._fit.update(distance)
        if not self._fit.drift_detected:
            return False
        self._metrics.drift.labels("fit").inc()
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY_S:  # a log line, not a log flood
            log.info(
                "drift: %d detection(s); mean distance to segment centres now %.2f (event time %d)",
                self._unlogged,
                self._fit.estimation,
                event_ts,
            )
            self._unlogged, self._logged_at = 0, now
        return True
