"""The synthetic shop: reproducible, schema-valid, with every persona present."""

from __future__ import annotations

from collections import Counter

from schemas import EVENT_ADAPTER
from worker.generator import PERSONAS, generate


def test_same_seed_same_stream_and_exact_count() -> None:
    a, b = generate(300, 4000, seed=11), generate(300, 4000, seed=11)
    assert a.events == b.events and a.truth == b.truth
    assert len(a.events) == 4000
    assert generate(300, 4000, seed=12).events != a.events


def test_events_follow_the_schema_in_event_time_order() -> None:
    shop = generate(200, 3000, seed=2)
    events = [EVENT_ADAPTER.validate_python(e) for e in shop.events]
    times = [e.timestamp for e in events]
    assert times == sorted(times)
    assert {e.user_id for e in events} == set(shop.truth)
    kinds = Counter(e.event_type for e in events)
    assert kinds["purchase"] > 0 and kinds["product_view"] > 0 and kinds["search"] > 0


def test_at_least_five_personas_all_present() -> None:
    assert len(PERSONAS) >= 5
    shop = generate(1000, 15_000, seed=3)
    assert set(shop.truth.values()) == {p.name for p in PERSONAS}


def test_window_shoppers_never_buy() -> None:
    shop = generate(500, 8000, seed=4)
    buyers = {e["user_id"] for e in shop.events if e["event_type"] == "purchase"}
    assert not any(shop.truth[u] == "window_shopper" for u in buyers)
