"""Kafka record -> validated event, or a dead letter that says why not.

Nothing here raises on bad input: every record becomes exactly one of the two, so
"consumed = applied + dead-lettered" holds by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from schemas.events import ALL_TYPES, EVENT_ADAPTER, ClickEvent, PurchaseEvent, UserDeleted
from worker.profiles import Position

REASONS = (
    "empty",
    "too_large",
    "not_json",
    "not_object",
    "unknown_event_type",
    "invalid",
    "bad_timestamp",
    "key_mismatch",
)

Event = ClickEvent | PurchaseEvent | UserDeleted


@dataclass(frozen=True, slots=True)
class Decoded:
    event: Event
    position: Position


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input record the worker cannot apply, with the machine-readable reason."""

    reason: str
    detail: str
    position: Position
    key: bytes | None
    value: bytes | None


class Decoder:
    def __init__(self, max_event_bytes: int) -> None:
        self._max_bytes = max_event_bytes

    def __call__(
        self, key: bytes | None, value: bytes | None, position: Position
    ) -> Decoded | DeadLetter:
        def dead(reason: str, detail: str) -> DeadLetter:
            return DeadLetter(reason, detail[:500], position, key, value)

        if value is None:
            return dead("empty", "record has no value (tombstone)")
        if len(value) > self._max_bytes:
            return dead(
                "too_large", f"{len(value)} bytes > decode.max_event_bytes {self._max_bytes}"
            )
        try:
            raw = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return dead("not_json", str(exc))
        if not isinstance(raw, dict):
            return dead("not_object", f"JSON value is a {type(raw).__name__}, not an object")
        event_type = raw.get("event_type")
        if event_type not in ALL_TYPES:
            return dead(
                "unknown_event_type", f"event_type {event_type!r} is not one of {ALL_TYPES}"
            )
        try:
            event = EVENT_ADAPTER.validate_python(raw)
        except ValidationError as exc:
            reason = "bad_timestamp" if _is_timestamp_error(exc) else "invalid"
            return dead(reason, _summary(exc))
        if key != event.user_id.encode():
            # Per-user ordering and the replay fence both rely on key = user_id.
            return dead("key_mismatch", f"record key {key!r} is not the event's user_id")
        return Decoded(event, position)


def _is_timestamp_error(exc: ValidationError) -> bool:
    """Only the timestamp is wrong (a present but unusable value, the DLQ's own reason)."""
    return all(
        error["loc"][1:2] == ("timestamp",) and error["type"] != "missing" for error in exc.errors()
    )


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc'][1:])}: {error['msg']}" for error in exc.errors()
    )
