"""The Prometheus metrics of the worker: one object, created once and passed to the stages.

Each worker owns its registry (not prometheus_client's global one), so several workers
in one process, as in tests, never share or collide on a metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
)
POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
DISTANCE_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0)
CHANGE_CAUSES = ("event", "model", "settled")  # why a user's segment changed


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "segmentation_events",
            "Valid events applied to profiles.",
            ["topic", "event_type"],
            registry=r,
        )
        self.invalid = Counter(
            "segmentation_events_invalid",
            "Records sent to the DLQ, by reason.",
            ["reason"],
            registry=r,
        )
        self.skipped = Counter(
            "segmentation_events_skipped",
            "Valid events not applied because they already are: replay after a crash or "
            "rebalance (reason=replay), or a producer's retry of an event id "
            "(reason=duplicate_event_id).",
            ["reason"],
            registry=r,
        )
        self.latency = Histogram(
            "segmentation_event_to_segment_latency_seconds",
            "From the event's append to Kafka (record timestamp) to its batch being written "
            "to Redis: how stale a segment can be, consumer lag included.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.distance = Histogram(
            "segmentation_assignment_distance",
            "Distance (standardized units) from a user's profile to their segment's centre.",
            buckets=DISTANCE_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "segmentation_consumer_lag",
            "Records behind the partition's high watermark.",
            ["topic", "partition"],
            registry=r,
        )
        self.segment_users = Gauge(
            "segmentation_segment_users",
            "Users currently in each segment.",
            ["segment"],
            registry=r,
        )
        self.segment_changes = Counter(
            "segmentation_segment_changes",
            "Users whose segment changed (first one included), by cause: their own event, "
            "the model (a first model for users who waited, or their segment retired or "
            "merged), or the sweep that places everyone afresh once the model has settled.",
            ["cause"],
            registry=r,
        )
        for cause in CHANGE_CAUSES:  # exported at 0 from the start
            self.segment_changes.labels(cause)
        self.drift = Counter(
            "segmentation_drift_detected",
            "Drift detections, by detector.",
            ["detector"],
            registry=r,
        )
        self.feature_mean = Gauge(
            "segmentation_feature_mean",
            "Population mean of each model feature (original units) in the model in use.",
            ["feature"],
            registry=r,
        )
        self.segment_share = Gauge(
            "segmentation_segment_share",
            "Share of the stored users in each segment.",
            ["segment"],
            registry=r,
        )
        self.centroid_shift = Gauge(
            "segmentation_segment_centroid_shift",
            "How far each segment's centre moved (standardized units) at the last model "
            "update this worker adopted.",
            ["segment"],
            registry=r,
        )
        self.psi = Gauge(
            "segmentation_segment_psi",
            "Population stability index of the segment shares, latest window against the "
            "reference window (> model.psi_threshold counts as drift).",
            registry=r,
        )
        self.lifecycle = Counter(
            "segmentation_segment_lifecycle",
            "Segments created, retired or merged by the model (counted by the leader).",
            ["event"],
            registry=r,
        )
        self.model_version = Gauge(
            "segmentation_model_version", "Version of the segment model in use.", registry=r
        )
        self.profiles_active = Gauge(
            "segmentation_profiles_active", "Profiles held in the worker's cache.", registry=r
        )
        self.users_deleted = Counter(
            "segmentation_users_deleted", "Users removed by user_deleted events.", registry=r
        )
        self.assigned_partitions = Gauge(
            "segmentation_assigned_partitions",
            "Input partitions assigned to this worker.",
            registry=r,
        )
        self.redis_errors = Counter(
            "segmentation_redis_errors",
            "Failed Redis operations (each is retried).",
            ["operation"],
            registry=r,
        )
        self.kafka_errors = Counter(
            "segmentation_kafka_errors",
            "Failed Kafka operations (retried; a failed asynchronous commit is covered by "
            "the next one).",
            ["operation"],
            registry=r,
        )
        self.poll_wait = Histogram(
            "segmentation_poll_wait_seconds",
            "Wall time of each poll of Kafka: the wait for a fetch, plus decoding the records "
            "it hands over (a few microseconds each). About a fetch round trip when the "
            "worker keeps up, decoding alone when a backlog is buffered, the poll timeout "
            "when idle.",
            buckets=POLL_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "segmentation_batch_seconds",
            "Wall time to process, write and commit one poll batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stale_batches = Counter(
            "segmentation_stale_batches",
            "Batches refused because another worker had already applied past them "
            "(this worker had lost the partitions in a rebalance).",
            registry=r,
        )
        self.checkpoints = Counter(
            "segmentation_model_checkpoints",
            "Model revisions this worker published to Redis (it held the lease).",
            registry=r,
        )
        self.model_revision = Gauge(
            "segmentation_model_revision",
            "Revision of the published model this worker assigns with.",
            registry=r,
        )
        self.model_learned_to = Gauge(
            "segmentation_model_learned_to_seconds",
            "Event time (Unix seconds) of the latest profile the model in use had learned "
            "when it was published: how far the segments' model has followed the stream.",
            registry=r,
        )
        self.model_settled = Gauge(
            "segmentation_model_settled",
            "1 once the model in use has learned past its settling time (users were placed "
            "afresh, and the switch margin holds them from then on), else 0.",
            registry=r,
        )
        self.model_leader = Gauge(
            "segmentation_model_leader",
            "1 when this worker holds the model lease (trains and publishes), else 0.",
            registry=r,
        )
