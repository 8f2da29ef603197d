"""One model for every worker of the consumer group, shared through Redis.

The worker holding the lease in `seg:model` trains a copy of the model (`trainer`) and
publishes it as a new revision every `model.checkpoint_interval_s`, and at once when it
seeds or refits. Every worker, the leader included, assigns with the latest published
revision (`model`). So a profile gets the same segment from whichever worker holds its
partition, segments move in steps all workers take together, and when the leader dies
the next worker to claim the expired lease (three intervals) goes on training from the
last publication. A worker adopts a publication at its own sync, or as soon as a write of
its finds a newer one (`behind`): followers that waited for their sync placed their
share of the shop without the newest segments for up to an interval (two workers' ARI
0.809 and 0.816 in two evaluations, against 0.849-0.855 for one).

The trainer learns from every worker's shoppers: the others hand it the profiles they
would have learned from through a Redis stream (`seg:learning`), with the users deleted
meanwhile and samples of their event mix for the `events` detector. Learning only from
its own partitions, the model of two workers saw half the shop, and its adaptation and
drift detectors, which count learned profiles, ran at half the pace of the events (two
evaluations: ARI 0.807 and 0.772 against 0.849-0.855 for one worker, the sale's segment
after about 29,000 events against about 10,000); the `events` detector, watching the
leader's partitions, caught the sale after 4,585-5,930 events against 2,022-2,678.
"""

from __future__ import annotations

import heapq
import logging
from operator import itemgetter
from typing import Any

import orjson

from config.settings import ModelSettings
from schemas.events import ClickEvent, PurchaseEvent
from schemas.records import SEGMENT_EVENTS, SegmentLifecycle
from worker.drift import EventMix, EventSample
from worker.learning import Learnable
from worker.metrics import Metrics
from worker.model import Learned, SegmentModel
from worker.sink import Handed, RedisStore

log = logging.getLogger(__name__)
SHARED_AT_ONCE = 2_000  # entries of the other workers the trainer reads per turn


class ModelCoordinator:
    def __init__(
        self, settings: ModelSettings, store: RedisStore, metrics: Metrics, worker_id: str
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._worker_id = worker_id
        self._lease_ms = int(3 * settings.checkpoint_interval_s * 1000)
        self.model = SegmentModel(settings)
        self.trainer: SegmentModel | None = None
        self._unusable = -1  # revision of a publication that could not be read: say so once
        self._shared_after = "0-0"  # the last entry of `seg:learning` learned from
        self._mix = EventMix()  # this worker's events, a sample at a time
        self._handing = Handed(worker_id)  # for the trainer, when following
        self._lifecycle: list[SegmentLifecycle] = []  # published with the model, not yet sent
        for event in SEGMENT_EVENTS:  # exported at 0 from the start, for dashboards
            metrics.lifecycle.labels(event)

    @property
    def leading(self) -> bool:
        return self.trainer is not None

    def learn(self, own: list[Learnable]) -> list[tuple[int, Learned]]:
        """Train on this worker's profiles and what the others handed over, when leading;
        else hand them over (with the deletions and event-mix samples since) to the worker
        that trains. What learning revealed, with its event time."""
        if self.trainer is None:
            self._handing.learnable = own
            self._store.share_learning(self._handing)
            self._handing = Handed(self._worker_id)
            return []
        self._shared_after, theirs = self._store.read_shared(self._shared_after, SHARED_AT_ONCE)
        held, self._handing = self._handing, Handed(self._worker_id)  # from when following
        revealed = [
            (ts, Learned(drifts=("events",), detail=detail))
            for handed in [held, *theirs]
            for ts, sample in handed.samples
            if (detail := self._detect(sample, ts)) is not None
        ]
        # Each worker's profiles in the order it took them, interleaved by event time as
        # one worker's would be (the detectors are order-sensitive); then the deletions.
        learnable = heapq.merge(own, *(handed.learnable for handed in theirs), key=itemgetter(2))
        revealed += [(ts, self.trainer.learn_one(user, x, ts)) for user, x, ts in learnable]
        for handed in [held, *theirs]:
            for user_id in handed.forgotten:
                self.trainer.forget(user_id)
        return revealed

    def observe(self, event: ClickEvent | PurchaseEvent) -> str | None:
        """Count an applied event into this worker's event mix. Each full sample goes to
        the `events` detector of the trainer, handed over when another worker trains;
        what the detector saw, if this worker's sample made it fire."""
        sample = self._mix.add(event)
        if sample is None:
            return None
        if self.trainer is None:
            self._handing.samples.append((event.timestamp, sample))
            return None
        return self._detect(sample, event.timestamp)

    def _detect(self, sample: EventSample, event_ts: int) -> str | None:
        assert self.trainer is not None
        if not self.trainer.observe(sample, event_ts):
            return None
        return self.trainer.detectors.describe("events")

    def forget(self, user_id: str) -> None:
        """A deleted user leaves the trainer's reservoir, whichever worker trains."""
        if self.trainer is not None:
            self.trainer.forget(user_id)
        else:
            self._handing.forgotten.append(user_id)

    def behind(self, published_revision: int) -> bool:
        """Whether a publication of this revision is one to adopt (newer, and not one
        found unusable)."""
        return published_revision > self.model.revision and published_revision != self._unusable

    def sync(self, publish: bool = True) -> bool:
        """Claim or renew the lease and publish when leading (with `publish`), and adopt
        any newer publication. Returns True when the model used for assignment changed.
        """
        if publish:
            self._lead_and_publish()
        published = self._store.load_model()
        if published is None or published[0] <= self.model.revision:
            return False
        if published[0] == self._unusable:
            return False
        if self._adopt(self._parse(published[1])):
            return True
        self._unusable = published[0]
        return False

    def _lead_and_publish(self) -> None:
        leading = self._store.claim_model_lease(self._worker_id, self._lease_ms)
        self._metrics.model_leader.set(int(leading))
        if leading and self.trainer is None:
            self.trainer = self._published() or SegmentModel(
                self._settings, first_id=self._store.highest_segment_id() + 1
            )
            log.info("this worker now trains the model (from revision %d)", self.trainer.revision)
        elif not leading and self.trainer is not None:
            log.info("another worker holds the model lease now; following it")
            self.trainer = None
        if self.trainer is not None and self.trainer.ready:
            self.trainer.revision += 1
            self.trainer.rename()
            state = self.trainer.to_state()
            if self._store.publish_model(
                self._worker_id, orjson.dumps(state), self.trainer.revision
            ):
                self._metrics.checkpoints.inc()
                for record in self.trainer.lifecycle:
                    if record.event != "drift_detected":
                        self._metrics.lifecycle.labels(record.event).inc()
                self._lifecycle += self.trainer.lifecycle
                self.trainer.lifecycle = []
                log.info(
                    "published model v%d revision %d", self.trainer.version, self.trainer.revision
                )
            else:
                self.trainer = None  # the lease expired between claim and publish

    def take_lifecycle(self) -> list[SegmentLifecycle]:
        """Lifecycle records of the publications so far, for `segment-lifecycle`."""
        records, self._lifecycle = self._lifecycle, []
        return records

    def release(self) -> None:
        """Hand training to another worker at once instead of after the lease expires."""
        if self.trainer is not None:
            self._store.release_model_lease(self._worker_id)
            self.trainer = None

    def _published(self) -> SegmentModel | None:
        published = self._store.load_model()
        if published is None:
            return None
        state = self._parse(published[1])
        return self._build(state) if state is not None else None

    def _parse(self, blob: bytes) -> dict[str, Any] | None:
        try:
            state = orjson.loads(blob)
        except orjson.JSONDecodeError as exc:
            log.error("published model is not JSON (%s); ignoring it", exc)
            return None
        return state if isinstance(state, dict) else None

    def _build(self, state: dict[str, Any], learning: bool = True) -> SegmentModel | None:
        try:
            return SegmentModel.from_state(self._settings, state, learning)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("published model unusable (%s); a fresh model will replace it", exc)
            return None

    def _adopt(self, state: dict[str, Any] | None) -> bool:
        model = self._build(state, learning=False) if state is not None else None
        if model is None:
            return False
        for segment, shift in model.shift_from(self.model).items():
            self._metrics.centroid_shift.labels(segment).set(shift)
        for name, mean in model.scaler.means.items():
            self._metrics.feature_mean.labels(name).set(mean)
        self._metrics.psi.set(model.detectors.shares.psi)
        self.model = model
        self._metrics.model_version.set(model.version)
        self._metrics.model_revision.set(model.revision)
        self._metrics.model_learned_to.set(model.learned_to / 1000)
        self._metrics.model_settled.set(int(model.settled))
        return True
