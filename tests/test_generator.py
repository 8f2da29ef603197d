"""The synthetic shop: reproducible, schema-valid, with every persona present."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas import EVENT_ADAPTER
from worker.generator import ARRIVING, PERSONAS, event_ms, generate


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


def test_drift_schedule_sale_and_new_persona_with_their_onsets() -> None:
    shop = generate(800, 16_000, seed=4)
    assert set(shop.drifts) == {"sale", "new_persona"}
    window_shopper_orders = [
        event_ms(e)
        for e in shop.events
        if e["event_type"] == "purchase" and shop.truth[str(e["user_id"])] == "window_shopper"
    ]
    assert window_shopper_orders, "the sale made no window shopper buy"
    assert min(window_shopper_orders) >= shop.drifts["sale"]
    arrivals = [e for e in shop.events if shop.truth[str(e["user_id"])] == ARRIVING]
    assert min(event_ms(e) for e in arrivals) == shop.drifts["new_persona"]
    assert shop.drifts["new_persona"] > event_ms(shop.events[len(shop.events) // 2])


def test_new_visitors_arrive_together_and_lapsing_customers_lapse_one_by_one() -> None:
    """A crowd arrives at the new persona's onset (each visitor's first session is at
    their join, within 2 % of the timeline either side), while lapsing customers stop
    buying at their own times, not on one day: that would be a drift of its own."""
    shop = generate(1500, 60_000, seed=5)
    span = event_ms(shop.events[-1]) - event_ms(shop.events[0])
    first: dict[str, int] = {}
    last_order: dict[str, int] = {}
    for e in shop.events:
        user = str(e["user_id"])
        first.setdefault(user, event_ms(e))
        if e["event_type"] == "purchase" and shop.truth[user] == "lapsing_customer":
            last_order[user] = event_ms(e)
    onset = shop.drifts["new_persona"]
    arrived = [first[u] - onset for u, persona in shop.truth.items() if persona == ARRIVING]
    assert max(arrived) <= 0.05 * span
    lapsed = sorted(last_order.values())
    assert lapsed[-1] < shop.drifts["sale"]
    assert lapsed[len(lapsed) * 3 // 4] - lapsed[len(lapsed) // 4] > 0.1 * span


def test_the_schedule_says_when_each_drift_starts_and_a_sale_does_not_revive_the_lapsed() -> None:
    """`evaluate --sale-at --new-persona-at`: each drift starts at its fraction of the
    timeline. A sale that comes while lapsing customers are still lapsing (each stops
    buying by half the timeline) makes those who still buy buy more, and does not bring
    back those who stopped: no lapsing customer orders after half the timeline."""
    shop = generate(1500, 60_000, seed=5, starts={"sale": 0.2, "new_persona": 0.6})
    first, last = event_ms(shop.events[0]), event_ms(shop.events[-1])

    def at(fraction: float) -> int:
        return first + int(fraction * (last - first))

    assert at(0.19) <= shop.drifts["sale"] <= at(0.21)
    assert at(0.58) <= shop.drifts["new_persona"] <= at(0.62)
    lapsing_orders = [
        event_ms(e)
        for e in shop.events
        if e["event_type"] == "purchase" and shop.truth[str(e["user_id"])] == "lapsing_customer"
    ]
    assert any(t >= shop.drifts["sale"] for t in lapsing_orders)  # those still buying
    assert max(lapsing_orders) < at(0.51)
    with pytest.raises(ValueError, match=r"sale starts at 1\.2"):
        generate(300, 4000, seed=5, starts={"sale": 1.2, "new_persona": 0.6})


def test_stationary_shop_has_no_drift() -> None:
    shop = generate(500, 8000, seed=4, drifts=())
    assert shop.drifts == {}
    assert ARRIVING not in set(shop.truth.values()) and len(set(shop.truth.values())) >= 5
    buyers = {e["user_id"] for e in shop.events if e["event_type"] == "purchase"}
    assert not any(shop.truth[str(u)] == "window_shopper" for u in buyers)


def test_each_drift_can_be_scheduled_alone() -> None:
    """`evaluate --drift`: a shop with one drift of the schedule, the other not in it, so
    each drift's response is measured from a shop that has settled without the other."""
    newcomers = generate(800, 16_000, seed=4, drifts=("new_persona",))
    assert set(newcomers.drifts) == {"new_persona"}
    assert ARRIVING in set(newcomers.truth.values())
    bought = {str(e["user_id"]) for e in newcomers.events if e["event_type"] == "purchase"}
    assert not any(newcomers.truth[u] == "window_shopper" for u in bought)  # no sale
    sale = generate(800, 16_000, seed=4, drifts=("sale",))
    assert set(sale.drifts) == {"sale"} and ARRIVING not in set(sale.truth.values())
    with pytest.raises(ValueError, match="flash_crash"):
        generate(800, 16_000, seed=4, drifts=("flash_crash",))
