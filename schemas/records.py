"""What the worker writes for other services: Redis keys and hashes, and change events.

Readers in other services depend on these names; change them only together with
DESIGN.md and the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

KEY_FORMAT = 1
"""Version of the key layout below; bumped on any change readers would notice."""

SegmentEvent = Literal["created", "retired", "merged"]
SEGMENT_EVENTS: tuple[str, ...] = get_args(SegmentEvent)  # what changes the set of segments


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Key layout under one prefix (DESIGN.md, "Redis").

    User ids are used verbatim as the last key component, so ids containing ':' or
    '*' stay unambiguous: nothing follows them.
    """

    prefix: str = "seg"

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"

    def profile(self, user_id: str) -> str:
        return f"{self.prefix}:profile:{user_id}"

    def segment(self, segment_id: str) -> str:
        return f"{self.prefix}:segment:{segment_id}"

    def members(self, segment_id: str) -> str:
        """Sorted set of the segment's users, scored by last write (epoch ms)."""
        return f"{self.prefix}:members:{segment_id}"

    @property
    def segments(self) -> str:
        return f"{self.prefix}:segments"

    @property
    def pending(self) -> str:
        """Set of users whose events were applied before any model existed: they get
        their first segment as soon as one is published, from whichever worker owns them."""
        return f"{self.prefix}:pending"

    @property
    def offsets(self) -> str:
        """Hash `topic:partition` -> last offset applied to Redis (the replay fence)."""
        return f"{self.prefix}:offsets"

    @property
    def swept(self) -> str:
        """Hash `topic:partition` -> the settling time (epoch ms) of the model whose
        settling ended with that partition's users placed afresh."""
        return f"{self.prefix}:swept"

    @property
    def learning(self) -> str:
        """Stream of the profiles the other workers learned from, for the one that trains
        the model (capped: older entries are dropped)."""
        return f"{self.prefix}:learning"

    @property
    def format(self) -> str:
        """The KEY_FORMAT the writer uses, so readers notice a layout change."""
        return f"{self.prefix}:format"

    @property
    def model(self) -> str:
        """The model checkpoint (JSON): scaler, centres, segment registry, version."""
        return f"{self.prefix}:model"


class UserSegment(BaseModel):
    """`seg:user:{user_id}`: the user's current segment."""

    model_config = ConfigDict(frozen=True)

    segment: str
    segment_name: str
    model_version: int
    distance: float
    updated_at: int


class SegmentRecord(BaseModel):
    """`seg:segment:{id}`: one live segment, its centroid in original feature units."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    size: int
    centroid: dict[str, float]
    created_at: int
    model_version: int


class SegmentChange(BaseModel):
    """A message on `segment-changes`: the user moved from one segment to another.

    `from` is null for a user's first segment, `to` is null when the user was deleted.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    user_id: str
    from_: str | None = Field(alias="from")
    to: str | None
    model_version: int
    timestamp: int


class SegmentLifecycle(BaseModel):
    """A message on `segment-lifecycle`: the set of segments changed, or drift was seen.

    `event` is `created` (a new segment id), `retired` (an id that no longer describes
    anyone; never reused), `merged` (absorbed `into` another segment, its users follow),
    or `drift_detected` (by `detector`; `segment` is null). `model_version` is the version
    the change produced (for drift, the version that saw it); `timestamp` is event time.
    """

    model_config = ConfigDict(frozen=True)

    event: Literal[SegmentEvent, "drift_detected"]
    segment: str | None = None
    into: str | None = None
    detector: str | None = None
    model_version: int
    timestamp: int
