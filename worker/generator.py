"""A synthetic shop: users with behavioural personas, their sessions, clicks and orders.

Seeded and reproducible: the same arguments always give the same events in the same
order. Every event follows the schema of DESIGN.md; clicks carry ISO-8601 timestamps and
purchases epoch milliseconds, as real producers mix both. Each user's persona is the
ground truth for evaluating the segments.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum

from schemas.events import CLICK_TYPES

DAY_MS = 86_400_000
START_MS = int(datetime(2026, 9, 1, tzinfo=UTC).timestamp() * 1000)
CATEGORIES = ("audio", "books", "fashion", "garden", "gaming", "home", "kitchen", "sports", "toys")


@dataclass(frozen=True, slots=True)
class Persona:
    name: str
    share: float
    sessions_per_day: float
    events_per_session: float
    mix: dict[str, float]
    buy_per_session: float
    price: float
    items_per_order: float = 1.5
    joins_at: float = 0.0  # fraction of the timeline before the user appears
    buy_changes_at: float = 1.0  # fraction of the user's active span after which they
    buy_after: float = 0.0  # buy this often per session instead
    buy_changes_spread: float = 0.0  # each user's own change comes up to this much either side
    sale_at: float = 1.0  # fraction of the timeline from which a sale runs (1: no sale)
    sale_buy: float = 0.0  # in the sale, buy in at least this share of sessions
    categories: tuple[str, ...] = CATEGORIES


def _mix(**weights: float) -> dict[str, float]:
    return {name: weights.get(name, 0.0) for name in CLICK_TYPES}


PERSONAS: tuple[Persona, ...] = (
    Persona(
        "loyal_big_spender",
        0.15,
        0.18,
        10,
        _mix(page_view=2, product_view=5, search=1, add_to_cart=3, checkout_start=1.5),
        buy_per_session=0.55,
        price=160,
        items_per_order=2.5,
        categories=("audio", "fashion", "home"),
    ),
    Persona(
        "bargain_hunter",
        0.2,
        0.16,
        14,
        _mix(
            page_view=2,
            product_view=5,
            search=5,
            add_to_cart=2,
            remove_from_cart=1,
            checkout_start=0.5,
        ),
        buy_per_session=0.45,
        price=14,
        items_per_order=3,
    ),
    Persona(
        "window_shopper",
        0.25,
        0.16,
        9,
        _mix(page_view=4, product_view=6, search=1, wishlist_add=1.5),
        buy_per_session=0.0,
        price=100,
    ),
    Persona(
        "new_visitor",
        0.15,
        0.2,
        5,
        _mix(page_view=5, product_view=3, search=1),
        buy_per_session=0.02,
        price=32,
    ),
    Persona(
        "lapsing_customer",
        0.15,
        0.15,
        7,
        _mix(page_view=4, product_view=4, search=1, add_to_cart=1),
        buy_per_session=0.85,
        price=60,
        buy_changes_at=0.3,
        buy_changes_spread=0.2,
    ),
    Persona(
        "cart_abandoner",
        0.1,
        0.14,
        10,
        _mix(page_view=1, product_view=4, add_to_cart=5, remove_from_cart=2, checkout_start=3),
        buy_per_session=0.03,
        price=55,
    ),
)


SALE_WINDOW_SHOPPERS_BUY = 0.5  # in the sale, window shoppers buy in this share of their
SALE_BOOST = 1.5  # sessions, and everyone else this many times as often as they would
ARRIVING = "new_visitor"  # the persona that appears mid-stream, at the `new_persona` start


class Drift(StrEnum):
    """A drift the schedule can hold (`scenario`)."""

    sale = "sale"
    new_persona = "new_persona"


DRIFTS: tuple[str, ...] = tuple(Drift)  # the drift schedule of a default run
# When each drift starts, as a fraction of the timeline (`evaluate --sale-at
# --new-persona-at`), and the default shop's size (`evaluate --users --events`): 97 days
# (seed 7), the sale's first 29 turning nine in ten window shoppers into buyers before
# the new persona arrives, so each drift's answer is measured on its own (README,
# Evaluation).
STARTS: dict[str, float] = {Drift.sale: 0.55, Drift.new_persona: 0.85}
SHOP_USERS = 20_000
SHOP_EVENTS = 3_000_000


@dataclass(slots=True)
class Shop:
    """The generated stream: events in event-time order, each user's persona (ground
    truth), and the event time (epoch ms) at which each scheduled drift starts."""

    events: list[dict[str, object]] = field(default_factory=list)
    truth: dict[str, str] = field(default_factory=dict)
    drifts: dict[str, int] = field(default_factory=dict)


def scenario(
    drifts: Collection[str] = DRIFTS, starts: Mapping[str, float] = STARTS
) -> tuple[Persona, ...]:
    """The personas of a run under a drift schedule, any of `DRIFTS`, each starting at its
    fraction of the timeline in `starts`: from the `sale` on, window shoppers buy and
    everyone else buys more (a lapsed customer still buys nothing); with `new_persona`,
    new visitors appear.
    Without either, a stationary shop: the other personas, each behaving the same
    throughout but for lapsing customers, each of whom stops buying at their own time."""
    unknown = set(drifts) - set(DRIFTS)
    if unknown:
        raise ValueError(f"unknown drifts {sorted(unknown)}: the schedule knows {DRIFTS}")
    for drift in drifts:
        if not 0 < starts[drift] < 1:
            raise ValueError(f"{drift} starts at {starts[drift]}: not within the timeline (0-1)")
    cast = PERSONAS if "new_persona" in drifts else tuple(p for p in PERSONAS if p.name != ARRIVING)
    cast = tuple(
        replace(p, joins_at=starts["new_persona"]) if p.name == ARRIVING else p for p in cast
    )
    if "sale" not in drifts:
        return cast

    def on_sale(p: Persona) -> Persona:
        if p.name == ARRIVING:
            return p
        floor = SALE_WINDOW_SHOPPERS_BUY if p.name == "window_shopper" else 0.0
        return replace(p, sale_at=starts["sale"], sale_buy=floor)

    return tuple(map(on_sale, cast))


def generate(
    users: int,
    events: int,
    seed: int = 7,
    drifts: Collection[str] = DRIFTS,
    starts: Mapping[str, float] = STARTS,
) -> Shop:
    """`events` events from `users` users, sorted by event time, under the drift schedule
    `drifts` starting at `starts` (see `scenario`; no drifts for a stationary shop).

    The timeline's length is chosen so the personas' rates produce at least `events`
    events; the stream is then cut to exactly that many.
    """
    cast = scenario(drifts, starts)
    personas = random.Random(seed).choices(cast, weights=[p.share for p in cast], k=users)
    days = _timeline_for(personas, events)
    while True:  # the rates are expectations: lengthen the timeline if the draw fell short
        rng = random.Random(seed)
        timed: list[tuple[int, int, dict[str, object]]] = []
        for index, persona in enumerate(personas):
            for ts, event in _user_events(rng, f"u-{index}", persona, days):
                timed.append((ts, len(timed), event))
        if len(timed) >= events:
            break
        days *= 1.05 * events / len(timed)
    timed.sort(key=lambda t: (t[0], t[1]))
    shop = Shop(events=[event for _, _, event in timed[:events]])
    seen = {str(e["user_id"]) for e in shop.events}
    shop.truth = {f"u-{i}": p.name for i, p in enumerate(personas) if f"u-{i}" in seen}
    if "sale" in drifts:
        shop.drifts["sale"] = START_MS + int(starts["sale"] * days * DAY_MS)
    if "new_persona" in drifts:
        arrivals = [event_ms(e) for e in shop.events if shop.truth[str(e["user_id"])] == ARRIVING]
        if arrivals:
            shop.drifts["new_persona"] = min(arrivals)
    return shop


def event_ms(event: dict[str, object]) -> int:
    ts = event["timestamp"]
    if isinstance(ts, int):
        return ts
    return int(datetime.fromisoformat(str(ts)).timestamp() * 1000)


def _timeline_for(personas: list[Persona], events: int) -> float:
    """Days of timeline whose expected event count is `events` (bisection).

    Every user has at least one session, so a user's expected sessions over an active
    span x is E[max(1, Poisson(x))] = x + e^-x, not x.
    """
    counts = Counter(p.name for p in personas)
    by_name = {p.name: p for p in personas}

    def expected(days: float) -> float:
        total = 0.0
        for name, n in counts.items():
            p = by_name[name]
            x = p.sessions_per_day * days * (1 - p.joins_at)
            total += n * (x + math.exp(-x)) * (p.events_per_session + p.buy_per_session)
        return total

    low, high = 0.0, 1.0
    while expected(high) < events:
        high *= 2
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if expected(mid) < events else (low, mid)
    return high


def _user_events(
    rng: random.Random, user_id: str, p: Persona, days: float
) -> Iterator[tuple[int, dict[str, object]]]:
    start = p.joins_at * days * rng.uniform(0.98, 1.02) if p.joins_at else 0.0
    active = days - start
    spread = p.buy_changes_spread
    buy_change = start + (p.buy_changes_at + rng.uniform(-spread, spread)) * active
    sale_from = p.sale_at * days
    n_sessions = max(1, _poisson(rng, p.sessions_per_day * active))
    favourites = rng.sample(p.categories, k=min(2, len(p.categories)))
    counter = 0
    # A user who joins mid-stream arrives then: their first session is at the join.
    days_of = sorted(rng.uniform(start, days) for _ in range(n_sessions))
    if p.joins_at:
        days_of[0] = start
    for s, day in enumerate(days_of):
        ts = START_MS + int(day * DAY_MS)
        session_id = f"{user_id}-s{s}"
        cart: list[tuple[str, str, float]] = []
        for _ in range(1 + _poisson(rng, p.events_per_session - 1)):
            ts += rng.randint(5_000, 90_000)
            counter += 1
            kind = rng.choices(CLICK_TYPES, weights=list(p.mix.values()))[0]
            category = rng.choice(favourites) if rng.random() < 0.7 else rng.choice(CATEGORIES)
            price = round(p.price * math.exp(rng.gauss(0, 0.35)), 2)
            product_id = f"p-{category}-{rng.randint(1, 400)}"
            event: dict[str, object] = {
                "event_id": f"{user_id}-{counter}",
                "event_type": kind,
                "user_id": user_id,
                "session_id": session_id,
                "timestamp": iso(ts),
            }
            if kind != "page_view" and kind != "search":
                event |= {"product_id": product_id, "category": category, "price": price}
            if kind == "add_to_cart":
                cart.append((product_id, category, price))
            yield ts, event
        buy_p = p.buy_per_session if day < buy_change else p.buy_after
        if day >= sale_from:
            buy_p = max(min(SALE_BOOST * buy_p, 1.0), p.sale_buy)
        if rng.random() < buy_p:
            ts += rng.randint(10_000, 120_000)
            counter += 1
            n_items = max(1, _poisson(rng, p.items_per_order))
            lines = cart[:n_items] or [
                (
                    f"p-{favourites[0]}-{rng.randint(1, 400)}",
                    favourites[0],
                    round(p.price * math.exp(rng.gauss(0, 0.35)), 2) * n_items,
                )
            ]
            items = [
                {"product_id": pid, "category": cat, "quantity": 1, "unit_price": price}
                for pid, cat, price in lines
            ]
            total = round(sum(price for _, _, price in lines), 2)
            order_id = f"o-{user_id}-{counter}"
            yield (
                ts,
                {
                    "event_id": order_id,
                    "event_type": "purchase",
                    "user_id": user_id,
                    "order_id": order_id,
                    "timestamp": ts,
                    "currency": "USD",
                    "total": total,
                    "items": items,
                },
            )


def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's method for small means, a rounded normal for large ones."""
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, product = math.exp(-lam), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def iso(ts_ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC, as the clicks carry them."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
