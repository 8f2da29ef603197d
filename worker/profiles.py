"""The incremental profile of one shopper, and a bounded cache of profiles over Redis.

A profile is a fold over the user's events on event time: every decayed quantity is
multiplied by 2^(-Δt / half-life) when the user's clock moves forward, so replaying the
same events in the same order gives bit-for-bit the same profile, whenever it runs.
An event older than the user's clock (out of order) does not rewind the clock; its
own weight is decayed instead.

A producer that retries may send the same event again at a new offset; the profile keeps
digests of the ids of its last few events, so such a duplicate is skipped too. Of the
current session it keeps a digest too, not the id: session ids are often UUIDs, 36 bytes
a user in Redis where 8 tell a new session from the last one as well.

The profile also carries the replay fence: per input topic, the partition and offset of
the last event applied to it. All of a user's events on a topic come from one partition
(the key is the user id), so an event at or below that offset is already applied.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import orjson

from config.settings import ProfileSettings
from schemas.events import CLICK_TYPES, ClickEvent, PurchaseEvent

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MINUTE_MS = 60_000
STORED = 2  # first element of `Profile.encode`'s array; the layout before began with a string
COUNTED = (*CLICK_TYPES, "purchase")  # positions of the stored counts: only ever append
DIGEST_BYTES = 8
EARLIER_FIELDS = (  # what releases before `STORED` kept, in this order, by name in JSON
    *("user_id", "fence", "first_ts", "last_ts", "counts", "sessions", "session_id", "orders"),
    *("monetary", "spend", "last_purchase_ts", "price_sum", "price_weight", "categories"),
    *("segment", "last_click_ts", "recent_ids"),
)


class Position(NamedTuple):
    """Where an event was read: its topic, partition and offset."""

    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class Profile:
    user_id: str
    fence: dict[str, list[int]] = field(default_factory=dict)
    first_ts: int = 0
    last_ts: int = 0
    counts: dict[str, float] = field(default_factory=dict)
    sessions: float = 0.0
    session: bytes | None = None  # digest of the last click's session id
    orders: int = 0
    monetary: float = 0.0
    spend: float = 0.0
    last_purchase_ts: int | None = None
    price_sum: float = 0.0
    price_weight: float = 0.0
    categories: dict[str, float] = field(default_factory=dict)
    segment: str | None = None
    last_click_ts: int = 0
    recent_ids: dict[str, list[bytes]] = field(default_factory=dict)

    def applied(self, position: Position) -> bool:
        """Whether the event at this position is already folded into the profile."""
        last = self.fence.get(position.topic)
        return last is not None and last[0] == position.partition and position.offset <= last[1]

    def seen(self, event_id: str, topic: str) -> bool:
        """Whether an event with this id was among the last ones applied from the topic
        (a producer's retry lands on the same topic)."""
        return event_digest(event_id) in self.recent_ids.get(topic, ())

    def owned_by(self, partitions: set[tuple[str, int]]) -> bool:
        return any((topic, last[0]) in partitions for topic, last in self.fence.items())

    @property
    def aov(self) -> float:
        return self.monetary / self.orders if self.orders else 0.0

    @property
    def mean_price(self) -> float:
        return self.price_sum / self.price_weight if self.price_weight else 0.0

    def top_categories(self, n: int) -> list[tuple[str, float]]:
        return sorted(self.categories.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def encode(self) -> bytes:
        """The profile as stored in Redis: a msgpack array in a fixed layout (`STORED`).

        Most of what Redis keeps per user is this blob, so it carries no field names, no
        user id (the key has it), event-type counts by position, the other timestamps as
        offsets back from the clock, whole floats as ints, and each topic's fence and
        recent event digests together (digests as raw bytes). Other floats stay 64-bit, so
        a decoded profile is bit-for-bit the live one and a replay can be checked byte
        for byte."""
        clock = self.last_ts
        topics = [*self.fence, *(topic for topic in self.recent_ids if topic not in self.fence)]
        blob: bytes = msgpack.packb(
            [
                STORED,
                clock,
                clock - self.first_ts,
                None if not self.last_click_ts else clock - self.last_click_ts,
                None if self.last_purchase_ts is None else clock - self.last_purchase_ts,
                [_compact(self.counts.get(name)) for name in COUNTED],
                [
                    _compact(self.sessions),
                    self.orders,
                    _compact(self.monetary),
                    _compact(self.spend),
                    _compact(self.price_sum),
                    _compact(self.price_weight),
                ],
                {name: _compact(weight) for name, weight in self.categories.items()},
                self.session,
                self.segment,
                {
                    topic: [
                        *self.fence.get(topic, (None, None)),
                        _pack_digests(self.recent_ids.get(topic)),
                    ]
                    for topic in topics
                },
            ]
        )
        return blob

    @classmethod
    def decode(cls, user_id: str, blob: bytes | str) -> Profile:
        """A profile from `encode`, or from what earlier releases stored: a msgpack array
        of every field in declaration order, or before that a JSON object."""
        if isinstance(blob, str) or blob[:1] == b"{":
            return cls._upgraded(orjson.loads(blob))
        fields = msgpack.unpackb(blob)
        if fields[0] != STORED:
            return cls._upgraded(dict(zip(EARLIER_FIELDS, fields, strict=True)))
        _, clock, first, click, purchase, counts, sums, categories, session, segment, topics = (
            fields
        )
        sessions, orders, monetary, spend, price_sum, price_weight = sums
        return cls(
            user_id=user_id,
            fence={t: [p, o] for t, (p, o, _) in topics.items() if p is not None},
            first_ts=clock - first,
            last_ts=clock,
            counts={
                name: float(n) for name, n in zip(COUNTED, counts, strict=False) if n is not None
            },
            sessions=float(sessions),
            session=event_digest(session) if isinstance(session, str) else session,
            orders=orders,
            monetary=float(monetary),
            spend=float(spend),
            last_purchase_ts=None if purchase is None else clock - purchase,
            price_sum=float(price_sum),
            price_weight=float(price_weight),
            categories={name: float(weight) for name, weight in categories.items()},
            segment=segment,
            last_click_ts=0 if click is None else clock - click,
            recent_ids={t: _unpack_digests(d) for t, (_, _, d) in topics.items() if d is not None},
        )

    @classmethod
    def _upgraded(cls, fields: dict[str, Any]) -> Profile:
        """Earlier releases kept the session id itself and the event digests as integers."""
        session = fields.pop("session_id")
        fields["recent_ids"] = {
            t: [d.to_bytes(DIGEST_BYTES) for d in ids] for t, ids in fields["recent_ids"].items()
        }
        return cls(**fields, session=None if session is None else event_digest(session))


def _compact(value: float | None) -> float | int | None:
    """A whole float as an int (msgpack stores 0 or 1 in one byte, not nine); `float` on
    the way back restores exactly the same value."""
    if value is not None and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _pack_digests(digests: list[bytes] | None) -> bytes | None:
    return None if digests is None else b"".join(digests)


def _unpack_digests(packed: bytes) -> list[bytes]:
    return [packed[i : i + DIGEST_BYTES] for i in range(0, len(packed), DIGEST_BYTES)]


def event_digest(event_id: str) -> bytes:
    """64 bits of BLAKE2b: a compact id whose collisions are practically impossible."""
    return hashlib.blake2b(event_id.encode(), digest_size=DIGEST_BYTES).digest()


class ProfileUpdater:
    """Folds events into profiles with the decay and session rules of the settings."""

    def __init__(self, settings: ProfileSettings) -> None:
        self._half_life_ms = settings.half_life_days * DAY_MS
        self._session_gap_ms = settings.session_gap_minutes * MINUTE_MS
        self._top_categories = settings.top_categories
        self._dedupe_window = settings.dedupe_window

    def apply(
        self, profile: Profile, event: ClickEvent | PurchaseEvent, position: Position
    ) -> bool:
        """Fold the event in; False, changing nothing, when its id is among the last ones
        applied from its topic (a producer's retry)."""
        digest = event_digest(event.event_id)
        recent = profile.recent_ids.setdefault(position.topic, [])
        if digest in recent:
            return False
        weight = self._advance_clock(profile, event)
        if isinstance(event, ClickEvent) and self._starts_session(profile, event):
            profile.sessions += weight
        profile.counts[event.event_type] = profile.counts.get(event.event_type, 0.0) + weight
        if isinstance(event, PurchaseEvent):
            self._fold_purchase(profile, event, weight)
        else:
            if event.price is not None:
                profile.price_sum += weight * event.price
                profile.price_weight += weight
            if event.category is not None:
                self._add_category(profile, event.category, weight)
        profile.fence[position.topic] = [position.partition, position.offset]
        recent.append(digest)
        del recent[: max(len(recent) - self._dedupe_window, 0)]
        return True

    def _advance_clock(self, profile: Profile, event: ClickEvent | PurchaseEvent) -> float:
        """Decay the profile up to the event's time; return the weight of the event."""
        if not profile.first_ts:
            profile.first_ts = profile.last_ts = event.timestamp
            return 1.0
        dt = event.timestamp - profile.last_ts
        if dt < 0:
            profile.first_ts = min(profile.first_ts, event.timestamp)
            return float(0.5 ** (-dt / self._half_life_ms))
        factor = 0.5 ** (dt / self._half_life_ms)
        for name in profile.counts:
            profile.counts[name] *= factor
        for name in profile.categories:
            profile.categories[name] *= factor
        profile.sessions *= factor
        profile.spend *= factor
        profile.price_sum *= factor
        profile.price_weight *= factor
        profile.last_ts = event.timestamp
        return 1.0

    def _starts_session(self, profile: Profile, event: ClickEvent) -> bool:
        """Sessions are a clickstream notion (orders carry no session id), so only clicks
        count them, which also keeps them independent of how the two input topics
        interleave. A new session id starts a session; without ids, a click more than the
        session gap after the previous click does."""
        if event.session_id is not None:
            session = event_digest(event.session_id)
            new = session != profile.session
            profile.session = session
        else:
            new = not profile.last_click_ts or (
                event.timestamp - profile.last_click_ts > self._session_gap_ms
            )
        profile.last_click_ts = max(profile.last_click_ts, event.timestamp)
        return new

    def _fold_purchase(self, profile: Profile, event: PurchaseEvent, weight: float) -> None:
        total = event.total or sum(item.unit_price * item.quantity for item in event.items)
        profile.orders += 1
        profile.monetary += total
        profile.spend += weight * total
        if profile.last_purchase_ts is None or event.timestamp > profile.last_purchase_ts:
            profile.last_purchase_ts = event.timestamp
        for item in event.items:
            if item.category is not None:
                self._add_category(profile, item.category, weight * item.quantity)

    def _add_category(self, profile: Profile, category: str, weight: float) -> None:
        cats = profile.categories
        cats[category] = cats.get(category, 0.0) + weight
        # Keep a few more than reported so a rising category can overtake a fading one.
        limit = 2 * self._top_categories
        if len(cats) > limit:
            for name, _ in sorted(cats.items(), key=lambda kv: (kv[1], kv[0]))[: len(cats) - limit]:
                del cats[name]


class ProfileCache:
    """A bounded LRU of profiles; the authoritative copy lives in Redis.

    Only clean profiles are ever evicted: the worker writes every profile it changed
    before the next poll, so eviction never loses an update.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._profiles: OrderedDict[str, Profile] = OrderedDict()

    def __len__(self) -> int:
        return len(self._profiles)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._profiles

    def __iter__(self) -> Iterator[Profile]:
        return iter(self._profiles.values())

    def get(self, user_id: str) -> Profile | None:
        profile = self._profiles.get(user_id)
        if profile is not None:
            self._profiles.move_to_end(user_id)
        return profile

    def put(self, profile: Profile) -> None:
        self._profiles[profile.user_id] = profile
        self._profiles.move_to_end(profile.user_id)

    def trim(self) -> None:
        """Evict least recently used profiles down to capacity (after a batch is written)."""
        while len(self._profiles) > self._capacity:
            self._profiles.popitem(last=False)

    def discard(self, user_ids: Iterable[str]) -> None:
        for user_id in user_ids:
            self._profiles.pop(user_id, None)

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> int:
        """Forget profiles fed by partitions this worker no longer owns; return how many."""
        gone = [p.user_id for p in self._profiles.values() if p.owned_by(partitions)]
        self.discard(gone)
        return len(gone)
