"""The wire contract: events read from Kafka and what is written to Redis and Kafka."""

from schemas.events import (
    ALL_TYPES,
    CLICK_TYPES,
    EVENT_ADAPTER,
    ClickEvent,
    Event,
    PurchaseEvent,
    PurchaseItem,
    UserDeleted,
)
from schemas.records import (
    RedisKeys,
    SegmentChange,
    SegmentLifecycle,
    SegmentRecord,
    UserSegment,
)

__all__ = [
    "ALL_TYPES",
    "CLICK_TYPES",
    "EVENT_ADAPTER",
    "ClickEvent",
    "Event",
    "PurchaseEvent",
    "PurchaseItem",
    "RedisKeys",
    "SegmentChange",
    "SegmentLifecycle",
    "SegmentRecord",
    "UserDeleted",
    "UserSegment",
]
