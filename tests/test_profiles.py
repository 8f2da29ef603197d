"""Profile math on event time: decay, sessions, orders, fences, replay, the cache."""

from __future__ import annotations

import random
from dataclasses import asdict

import msgpack
import orjson
import pytest

from config.settings import ProfileSettings
from schemas import ClickEvent, PurchaseEvent, PurchaseItem
from worker.features import FEATURES, FeatureExtractor
from worker.generator import generate
from worker.profiles import (
    DAY_MS,
    EARLIER_FIELDS,
    Position,
    Profile,
    ProfileCache,
    ProfileUpdater,
)

T0 = 1_790_000_000_000
SETTINGS = ProfileSettings(half_life_days=7, session_gap_minutes=30)


def click(
    ts: int, kind: str = "product_view", session: str | None = "s1", **kw: object
) -> ClickEvent:
    return ClickEvent(
        event_id=f"e{ts}",
        event_type=kind,
        user_id="u",
        timestamp=ts,  # type: ignore[arg-type]
        session_id=session,
        **kw,
    )


def purchase(ts: int, total: float, category: str = "audio") -> PurchaseEvent:
    return PurchaseEvent(
        event_id=f"o{ts}",
        event_type="purchase",
        user_id="u",
        order_id=f"o{ts}",
        timestamp=ts,
        total=total,
        items=[PurchaseItem(product_id="p", category=category, unit_price=total)],
    )


def fold(events: list[ClickEvent | PurchaseEvent], settings: ProfileSettings = SETTINGS) -> Profile:
    updater, profile = ProfileUpdater(settings), Profile("u")
    for offset, event in enumerate(events):
        updater.apply(profile, event, Position("t", 0, offset))
    return profile


def test_counts_halve_every_half_life_of_event_time() -> None:
    profile = fold([click(T0), click(T0 + 7 * DAY_MS, "page_view")])
    assert profile.counts["product_view"] == pytest.approx(0.5)
    assert profile.counts["page_view"] == 1.0
    profile = fold([click(T0), click(T0 + 14 * DAY_MS, "page_view")])
    assert profile.counts["product_view"] == pytest.approx(0.25)


def test_out_of_order_event_is_decayed_not_the_profile() -> None:
    profile = fold([click(T0 + 7 * DAY_MS), click(T0, "page_view")])
    assert profile.last_ts == T0 + 7 * DAY_MS  # the clock never rewinds
    assert profile.first_ts == T0
    assert profile.counts == {"product_view": 1.0, "page_view": pytest.approx(0.5)}


def test_replay_gives_identical_profiles() -> None:
    """Decay depends on event time only: two folds of the same events are equal bytes."""
    shop = generate(users=30, events=800, seed=3)
    from schemas import EVENT_ADAPTER

    events = [EVENT_ADAPTER.validate_python(e) for e in shop.events]
    first = {}
    second = {}
    for target in (first, second):
        updater = ProfileUpdater(SETTINGS)
        for offset, event in enumerate(events):
            profile = target.setdefault(event.user_id, Profile(event.user_id))
            updater.apply(profile, event, Position("t", 0, offset))  # type: ignore[arg-type]
    assert {u: p.encode() for u, p in first.items()} == {u: p.encode() for u, p in second.items()}


def test_sessions_by_id_or_by_gap() -> None:
    assert fold(
        [click(T0, session="a"), click(T0 + 1000, session="a"), click(T0 + 2000, session="b")]
    ).sessions == pytest.approx(2.0, abs=1e-4)
    gap = 31 * 60_000
    assert fold(
        [
            click(T0, session=None),
            click(T0 + 60_000, session=None),
            click(T0 + 60_000 + gap, session=None),
        ]
    ).sessions == pytest.approx(2.0, abs=0.01)


def test_orders_money_and_recency() -> None:
    profile = fold(
        [
            purchase(T0, 100.0),
            click(T0 + DAY_MS),
            purchase(T0 + 2 * DAY_MS, 50.0),
            click(T0 + 5 * DAY_MS),
        ]
    )
    assert profile.orders == 2
    assert profile.monetary == 150.0
    assert profile.aov == 75.0
    assert profile.last_purchase_ts == T0 + 2 * DAY_MS
    x = FeatureExtractor(SETTINGS)(profile)
    assert x["purchase_recency_days"] == pytest.approx(3.0)


def test_categories_are_bounded_and_ranked() -> None:
    settings = ProfileSettings(top_categories=2)
    events = [click(T0 + i, category=f"c{i % 7}") for i in range(50)]
    events += [click(T0 + 100 + i, category="favourite") for i in range(20)]
    profile = fold(events, settings)
    assert len(profile.categories) <= 4
    assert profile.top_categories(1)[0][0] == "favourite"


def test_a_session_id_is_stored_as_its_digest_whatever_its_length() -> None:
    short = fold([click(T0, session="s1")])
    long = fold([click(T0, session="0f8b7c52-6d1e-4c0b-9a55-3f2d1e7a9b10")])
    assert len(long.encode()) == len(short.encode())
    assert fold([click(T0, session="s1"), click(T0 + 1, session="s1")]).sessions == pytest.approx(1)


def test_fence_knows_what_was_applied() -> None:
    profile = fold([click(T0), click(T0 + 1)])  # offsets 0 and 1 on ("t", 0)
    assert profile.applied(Position("t", 0, 1))
    assert profile.applied(Position("t", 0, 0))
    assert not profile.applied(Position("t", 0, 2))
    assert not profile.applied(Position("other", 0, 0))


def test_encode_decode_round_trip_and_profiles_of_earlier_releases_still_load() -> None:
    events = [click(T0 + i * 3_600_000, price=10.0 + i / 3, category="books") for i in range(9)]
    profile = fold([*events, purchase(T0 + 40_000_000, 20.0)])
    blob = profile.encode()
    assert Profile.decode("u", blob) == profile
    # what earlier releases stored: every field, the session id itself, digests as
    # integers, in JSON and then msgpack; then the layout of STORED with the session id
    digests = {t: [int.from_bytes(d) for d in ids] for t, ids in profile.recent_ids.items()}
    fields = {**asdict(profile), "recent_ids": digests, "session_id": "s1"}
    fields = {name: fields[name] for name in EARLIER_FIELDS}
    as_json, as_fields = orjson.dumps(fields), msgpack.packb(list(fields.values()))
    layout = msgpack.unpackb(blob)
    layout[8] = "s1"
    for earlier in (as_json, as_json.decode(), as_fields, msgpack.packb(layout)):
        assert Profile.decode("u", earlier) == profile
    # the point of the fixed layout: Redis memory
    assert len(blob) <= 0.85 * len(as_fields) <= 0.5 * len(as_json)


@pytest.mark.parametrize(
    "profile",
    [
        Profile("empty"),
        Profile("purchases-only", fence={"p": [3, 9]}, orders=1, last_purchase_ts=T0, last_ts=T0),
        Profile("digests-without-fence", recent_ids={"t": []}, counts={"search": 0.0}),
        Profile("out-of-order", first_ts=T0, last_ts=T0 - 5, last_click_ts=T0 + 5),
    ],
    ids=lambda p: p.user_id,
)
def test_the_stored_layout_keeps_every_edge_of_a_profile(profile: Profile) -> None:
    """Absent and zero are different (a count that decayed to 0.0 is still there), and no
    timestamp order is assumed."""
    assert Profile.decode(profile.user_id, profile.encode()) == profile


def test_features_are_finite_and_bounded() -> None:
    rng = random.Random(1)
    extract = FeatureExtractor(SETTINGS)
    kinds = ["page_view", "product_view", "search", "add_to_cart", "checkout_start"]
    for _ in range(50):
        events: list[ClickEvent | PurchaseEvent] = []
        ts = T0
        for _ in range(rng.randint(1, 40)):
            ts += rng.randint(0, 3 * DAY_MS)
            if rng.random() < 0.1:
                events.append(purchase(ts, rng.uniform(1, 500)))
            else:
                events.append(click(ts, rng.choice(kinds), price=rng.uniform(1, 300)))
        x = extract(fold(events))
        assert tuple(x) == FEATURES
        for name in ("view_to_cart", "cart_to_purchase", "search_share"):
            assert 0.0 <= x[name] <= 1.0
        assert 0.0 <= x["purchase_recency_days"] <= SETTINGS.recency_cap_days
        assert 0.0 <= x["tenure_days"] <= SETTINGS.tenure_cap_days
        assert all(v == v and abs(v) < 1e6 for v in x.values())


def test_never_bought_has_capped_recency_and_no_orders() -> None:
    x = FeatureExtractor(SETTINGS)(fold([click(T0), click(T0 + DAY_MS, "add_to_cart")]))
    assert x["orders"] == 0.0
    assert x["purchase_recency_days"] == SETTINGS.recency_cap_days
    assert x["view_to_cart"] == 1.0


def test_tenure_grows_to_its_own_cap_and_stops() -> None:
    """Tenure tells a new profile from an established one, then stops moving users: it
    has its own cap, shorter than recency's."""
    extract = FeatureExtractor(SETTINGS)
    assert SETTINGS.tenure_cap_days < SETTINGS.recency_cap_days
    assert extract(fold([click(T0), click(T0 + 2 * DAY_MS)]))["tenure_days"] == 2.0
    for days in (8, 20, 40):
        late = extract(fold([click(T0), click(T0 + days * DAY_MS)]))
        assert late["tenure_days"] == SETTINGS.tenure_cap_days


def test_cache_evicts_least_recently_used_and_drops_revoked_partitions() -> None:
    cache = ProfileCache(capacity=2)
    for uid, partition in (("a", 0), ("b", 1), ("c", 1)):
        p = Profile(uid)
        p.fence["t"] = [partition, 0]
        cache.put(p)
    cache.get("a")  # touch: b is now the least recently used
    cache.trim()
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.drop_partitions({("t", 1)}) == 1
    assert "c" not in cache and len(cache) == 1


def test_recent_event_ids_are_remembered_within_the_window() -> None:
    settings = ProfileSettings(dedupe_window=3)
    profile = fold([click(T0 + i) for i in range(5)], settings)
    assert len(profile.recent_ids["t"]) == 3
    assert profile.seen(f"e{T0 + 4}", "t") and profile.seen(f"e{T0 + 2}", "t")
    assert not profile.seen(f"e{T0 + 1}", "t")  # fell out of the window
    assert not profile.seen("never-sent", "t")
    assert not profile.seen(f"e{T0 + 4}", "other-topic")
