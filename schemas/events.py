"""The events shops send on the input topics: the wire contract of DESIGN.md.

Every timestamp is normalised to epoch milliseconds (UTC) at the edge, so the rest
of the worker does time arithmetic on plain integers and never on timezones.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
)

# Accepted event time: from 2000-01-01 to 2100-01-01. Outside that range a timestamp is
# almost always a unit mistake (seconds for milliseconds, or microseconds) and would wreck
# every decayed count of the user, so such an event goes to the DLQ instead.
MIN_TIMESTAMP_MS = 946_684_800_000
MAX_TIMESTAMP_MS = 4_102_444_800_000

ClickType = Literal[
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "wishlist_add",
    "checkout_start",
]
CLICK_TYPES: tuple[str, ...] = get_args(ClickType)
ALL_TYPES = (*CLICK_TYPES, "purchase", "user_deleted")


def _to_epoch_ms(value: object) -> object:
    """ISO-8601 (with offset, UTC when none) or epoch milliseconds -> epoch ms."""
    if isinstance(value, bool):
        return value  # let the int validator reject it
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("timestamp must be finite")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError("timestamp is neither ISO-8601 nor epoch milliseconds") from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp() * 1000)
    return value


EpochMs = Annotated[
    int,
    Field(ge=MIN_TIMESTAMP_MS, lt=MAX_TIMESTAMP_MS),
    BeforeValidator(_to_epoch_ms),
    WithJsonSchema(
        {
            "description": "Event time: epoch milliseconds, or ISO-8601 (UTC when no offset)",
            "anyOf": [
                {
                    "type": "integer",
                    "minimum": MIN_TIMESTAMP_MS,
                    "exclusiveMaximum": MAX_TIMESTAMP_MS,
                },
                {"type": "string", "format": "date-time"},
            ],
        }
    ),
]
# Ids are printable text: no control characters (newlines would corrupt logs and
# line-based exports); ':' and spaces are fine because ids only ever end a Redis key.
Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
Money = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Label = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: Id
    user_id: Id
    timestamp: EpochMs


class ClickEvent(_Event):
    """A clickstream event: browsing, searching, carting."""

    event_type: ClickType
    session_id: Id | None = None
    product_id: Id | None = None
    category: Label | None = None
    price: Money | None = None


class PurchaseItem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    product_id: Id
    category: Label | None = None
    quantity: Annotated[int, Field(ge=1, le=10_000)] = 1
    unit_price: Money


class PurchaseEvent(_Event):
    """A completed order. `items` may be empty when only `total` is known."""

    event_type: Literal["purchase"]
    order_id: Id
    currency: Annotated[str, StringConstraints(min_length=3, max_length=3)] = "USD"
    total: Money
    items: Annotated[list[PurchaseItem], Field(max_length=1000)] = []


class UserDeleted(_Event):
    """Right to be forgotten: remove everything stored about the user."""

    event_type: Literal["user_deleted"]


Event = Annotated[ClickEvent | PurchaseEvent | UserDeleted, Field(discriminator="event_type")]
EVENT_ADAPTER: TypeAdapter[ClickEvent | PurchaseEvent | UserDeleted] = TypeAdapter(Event)
