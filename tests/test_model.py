"""The River model: seeding, stable ids through adaptation, hysteresis, drift detectors,
names, checkpoints."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable

import numpy as np
import orjson
import pytest
from conftest import event_mix

from config.settings import ModelSettings, ProfileSettings
from schemas import EVENT_ADAPTER
from schemas.events import ClickEvent, PurchaseEvent
from worker.drift import Detectors, EventMix, InEventTime, ShareShift, psi
from worker.features import FEATURES, FeatureExtractor
from worker.generator import generate
from worker.model import CHECKPOINT_FORMAT, SegmentModel, describe, keeps_meaning, match, rows
from worker.profiles import DAY_MS, Position, Profile, ProfileUpdater

SETTINGS = ModelSettings(n_clusters=6, warmup_users=200, seed=1)


def trained_model() -> tuple[SegmentModel, dict[str, dict[str, float]]]:
    shop = generate(users=600, events=12_000, seed=5)
    updater, extract = ProfileUpdater(ProfileSettings()), FeatureExtractor(ProfileSettings())
    model, profiles, latest = SegmentModel(SETTINGS), {}, {}
    for offset, raw in enumerate(shop.events):
        event = EVENT_ADAPTER.validate_python(raw)
        profile = profiles.setdefault(event.user_id, Profile(event.user_id))
        updater.apply(profile, event, Position("t", 0, offset))  # type: ignore[arg-type]
        latest[event.user_id] = extract(profile)
        model.learn_one(event.user_id, latest[event.user_id], event.timestamp)
    return model, latest


@pytest.fixture(scope="module")
def model_and_profiles() -> tuple[SegmentModel, dict[str, dict[str, float]]]:
    return trained_model()


def test_warm_up_then_k_means_plus_plus_seeding() -> None:
    model = SegmentModel(ModelSettings(n_clusters=3, warmup_users=10, seed=1))
    points = {f"u{i}": {name: float(i % 3) * 5 + 0.1 * i for name in FEATURES} for i in range(10)}
    for i, (user_id, x) in enumerate(points.items()):
        learned = model.learn_one(user_id, x, 1000 + i)
        assert learned.seeded == (i == 9) and model.ready == (i == 9)
    assert model.version == 1
    assert sorted(s.id for s in model.segments.values()) == ["s1", "s2", "s3"]
    # three well-separated groups: each group shares one segment, each its own
    groups: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    for i, x in enumerate(points.values()):
        groups[i % 3].add(model.assign(x).segment)
    assert all(len(ids) == 1 for ids in groups.values())
    assert len(set.union(*groups.values())) == 3


def test_learning_moves_the_nearest_centre_only() -> None:
    model = SegmentModel(ModelSettings(n_clusters=3, warmup_users=10, seed=1, learning_rate=0.5))
    for i in range(10):
        model.learn_one(f"u{i}", {n: float(i % 3) * 5 for n in FEATURES}, i)
    before = {i: dict(c) for i, c in model.kmeans.centers.items()}
    x = {n: 10.0 for n in FEATURES}
    nearest = next(i for i, s in model.segments.items() if s.id == model.assign(x).segment)
    model.learn_one("u-new", x, 99)
    moved = [i for i, c in model.kmeans.centers.items() if dict(c) != before[i]]
    assert moved == [nearest]


@pytest.mark.parametrize("learning", [True, False])
def test_checkpoint_round_trip_assigns_identically(model_and_profiles, learning: bool) -> None:  # type: ignore[no-untyped-def]
    model, profiles = model_and_profiles
    state = orjson.loads(orjson.dumps(model.to_state()))
    restored = SegmentModel.from_state(SETTINGS, state, learning)
    assert restored.version == model.version
    # what the next refit needs to tell a drained id (`_deserted`)
    assert restored.anchor_shares == model.anchor_shares
    assert sum(model.anchor_shares.values()) == pytest.approx(1.0)
    for x in list(profiles.values())[:200]:
        a, b = model.assign(x), restored.assign(x)
        assert a.segment == b.segment
        assert a.distance == pytest.approx(b.distance)
    # a copy that only assigns is built without the reservoir its refits would need
    assert len(restored.reservoir) == (len(model.reservoir) if learning else 0)


def test_checkpoint_carries_the_reservoir_and_rebuilds_the_detectors(model_and_profiles) -> None:  # type: ignore[no-untyped-def]
    model, _ = model_and_profiles
    state = orjson.loads(orjson.dumps(model.to_state()))
    assert len(state["reservoir"]) == len(model.reservoir) > SETTINGS.warmup_users
    restored = SegmentModel.from_state(SETTINGS, state)
    assert restored.to_state()["reservoir"] == state["reservoir"]
    # the detectors were rebuilt by replaying the reservoir: the fit detector's level is
    # the mean distance of those profiles to the centres
    replayed = [min(restored.distances(x).values()) for x in restored.reservoir.values()]
    assert restored.detectors.fit_level == pytest.approx(sum(replayed) / len(replayed), rel=0.05)


def test_fit_detector_fires_on_a_rise_only_and_stays_quiet_without_one() -> None:
    rng = random.Random(3)
    detectors = Detectors(SETTINGS)
    z = dict.fromkeys(FEATURES, 0.0)

    def feed(mean: float, n: int) -> list[list[str]]:
        return [detectors.update(z, 0, rng.gauss(mean, 0.3)) for _ in range(n)]

    assert not any("fit" in fired for fired in feed(1.0, 20_000))
    assert any("fit" in fired for fired in feed(1.6, 500)), "a rise of 2 sd went unnoticed"
    assert not any("fit" in fired for fired in feed(0.5, 2000)), "a better fit is no drift"


def test_feature_detector_names_the_feature_that_moved() -> None:
    rng = random.Random(4)
    detectors = Detectors(SETTINGS)

    def profile(conversion: float) -> dict[str, float]:
        return {n: rng.gauss(conversion if n == "conversion" else 0.0, 1.0) for n in FEATURES}

    assert not any("feature" in detectors.update(profile(0.0), 0, 1.0) for _ in range(20_000))
    fired = [detectors.update(profile(1.0), 0, 1.0) for _ in range(2000)]
    assert any("feature" in f for f in fired)
    assert detectors.moved == ["conversion"]


def test_events_detector_sees_a_sale_in_the_event_mix_within_2000_events() -> None:
    rng = random.Random(5)
    detectors, mix = Detectors(SETTINGS), EventMix()

    def fired(purchase_share: float, n: int) -> bool:
        samples = (mix.add(event) for event in event_mix(rng, purchase_share, n))
        return any([detectors.observe(sample) for sample in samples if sample is not None])

    assert not fired(0.025, 200_000), "a false alarm on a steady event mix"
    assert fired(0.06, 2000), "purchases more than doubled and 2,000 events went by unnoticed"
    assert detectors.moved == ["purchase share of events"]


def late_purchases(
    events: list[ClickEvent | PurchaseEvent], batch: int, late: int, every: int
) -> Iterable[tuple[list[tuple[float, ClickEvent | PurchaseEvent]], float]]:
    """The shop as a worker that keeps up applies it, `batch` events at a time, when the
    purchases' partition runs behind now and then: the purchases of every `every`-th
    stretch of `late` events come at once, when it ends. Each batch with its
    events' Kafka timestamps (the event's second) and what the partitions had been
    fetched to (`KafkaSource.fetched_to`): the last click, or the oldest purchase still
    to come."""
    due: dict[int, list[int]] = {}  # batch -> indexes of the purchases it delivers
    for i, event in enumerate(events):
        delayed = event.event_type == "purchase" and (i // late) % every == every - 1
        due.setdefault(((i // late + 1) * late if delayed else i) // batch, []).append(i)
    for k in range(len(events) // batch + every):
        mine = [i for i in range(k * batch, (k + 1) * batch) if i < len(events)]
        delivered = [i for i in mine if events[i].event_type != "purchase"] + [
            i for i in due.get(k, []) if events[i].event_type == "purchase"
        ]
        waiting = [i for j, held in due.items() if j > k for i in held if i < (k + 1) * batch]
        fetched = min([mine[-1] if mine else len(events), *(i - 1 for i in waiting)])
        yield [(events[i].timestamp / 1000, events[i]) for i in delivered], fetched


def test_a_partition_running_behind_is_no_drift_of_the_event_mix() -> None:
    """Purchases that come late, in lumps across batches, are no change of the mix once
    held until every partition is fetched past them (`InEventTime`); sorting each batch
    alone is not enough."""
    events = event_mix(random.Random(6), 0.025, 120_000)
    for hold in (False, True):
        detectors, mix, in_event_time = Detectors(SETTINGS), EventMix(), InEventTime()
        seen, fired = [], False
        for applied, fetched_to in late_purchases(events, batch=400, late=2400, every=4):
            if hold:
                going = in_event_time(applied, fetched_to)
            else:
                going = sorted((e for _, e in applied), key=lambda e: e.timestamp)
            for event in going:
                seen.append(event.timestamp)
                sample = mix.add(event)
                fired |= sample is not None and detectors.observe(sample)
        assert sorted(seen) == [e.timestamp for e in events]  # each once
        if hold:
            assert not fired and seen == sorted(seen)
        else:
            assert fired and detectors.moved == ["purchase share of events"]


def test_in_event_time_holds_at_most_its_limit() -> None:
    events = event_mix(random.Random(7), 0.025, 10)  # a second apart, stamped so
    hold = InEventTime(at_most=4)
    assert hold([(e.timestamp / 1000, e) for e in events[5:]], -1.0) == events[5:6]  # over
    # fetched to second 3: 0-3 may go, and 4 too, since 4 would wait beside 6-9
    assert hold([(e.timestamp / 1000, e) for e in events[:5]], 3.0) == events[:5]
    assert hold([], math.inf) == events[6:]


def test_segment_share_psi() -> None:
    assert psi(Counter({0: 50, 1: 50}), Counter({0: 50, 1: 50})) == 0
    assert psi(Counter({0: 50, 1: 50}), Counter({0: 80, 1: 20})) > 0.25
    shares = ShareShift(window=100, threshold=0.2)
    stable = [shares.update(i % 2) for i in range(1000)]
    assert not any(stable) and shares.psi < 0.01
    assert any(shares.update(0 if i % 10 else 1) for i in range(200))


def test_ids_go_to_the_minimum_total_distance_pairing() -> None:
    old = np.array([[0.0], [2.0]])
    new = np.array([[1.9], [3.8]])
    # nearest-first would pair old 2.0 with 1.9 (0.1) and leave 0.0 with 3.8 (3.8);
    # the least total distance pairs 0.0 with 1.9 and 2.0 with 3.8 (1.9 + 1.8)
    assert match(old, new) == {0: 0, 1: 1}
    assert match(old, np.array([[2.1], [9.0], [0.2]])) == {0: 1, 2: 0}  # 9.0 is new


def groups(n: int, centres: list[float], rng: random.Random) -> list[dict[str, float]]:
    """`n` profiles around each centre (on every feature), shuffled."""
    points = [
        {name: c + rng.gauss(0, 0.05) + 0.01 * k for k, name in enumerate(FEATURES)}
        for c in centres
        for _ in range(n)
    ]
    rng.shuffle(points)
    return points


def seeded(centres: list[float], **overrides: float) -> tuple[SegmentModel, dict[float, str]]:
    """A model seeded on well-separated groups, and the id each group got."""
    defaults = {
        "n_clusters": len(centres),
        "warmup_users": 300,
        "reservoir_size": 300,
        "adapt_after": 300,
        "settle_days": 0,
        "seed": 1,
    }
    settings = ModelSettings(**(defaults | overrides))  # type: ignore[arg-type]
    model = SegmentModel(settings)
    for i, x in enumerate(groups(300 // len(centres), centres, random.Random(1))):
        model.learn_one(f"u{i}", x, i)
    assert model.ready
    return model, {c: model.assign(dict.fromkeys(FEATURES, c)).segment for c in centres}


def segments_of(model: SegmentModel, centres: Iterable[float]) -> dict[float, str]:
    return {c: model.assign(dict.fromkeys(FEATURES, c)).segment for c in centres}


def learn_all(model: SegmentModel, points: list[dict[str, float]], at: int, tag: str) -> None:
    for i, x in enumerate(points):
        model.learn_one(f"{tag}{i}", x, at + i)


def test_refit_keeps_every_id_on_its_group() -> None:
    model, ids = seeded([0.0, 4.0, 8.0])
    for i, x in enumerate(groups(100, [0.0, 4.0, 8.0], random.Random(2))):
        model.learn_one(f"v{i}", x, 1000 + i)
    model.lifecycle.clear()
    model.adapt(2000)
    assert model.version == 2
    assert segments_of(model, ids) == ids
    assert model.lifecycle == []  # nothing created, retired or merged


def test_periodic_refits_keep_to_event_time_not_to_profiles_learned() -> None:
    """However many profiles a day of event time brings, the periodic refit comes once
    per `refit_days`: a busy shop must not re-version its model every few seconds."""
    model, ids = seeded([0.0, 4.0, 8.0], refit_days=1)
    within_a_day = [
        model.learn_one(f"v{i}", x, 1000 + i)
        for i, x in enumerate(groups(1000, [0.0, 4.0, 8.0], random.Random(2)))
    ]
    assert not any(learned.drifts for learned in within_a_day)  # no drift asks for a refit
    assert not any(learned.adapted for learned in within_a_day)
    assert model.version == 1
    assert model.learn_one("w0", dict.fromkeys(FEATURES, 4.0), DAY_MS + 300).adapted
    assert model.version == 2
    assert not model.learn_one("w1", dict.fromkeys(FEATURES, 4.0), DAY_MS + 301).adapted
    assert segments_of(model, ids) == ids


def test_a_drifts_refit_counts_only_profiles_from_after_the_detection() -> None:
    """Where the refit falls must not depend on how far learning lags the events (the
    windows of `learning.py` close after the fact): profiles as of before the detection's
    event time do not count toward `adapt_after`, and the count survives a checkpoint."""
    model, _ = seeded([0.0, 4.0, 8.0], adapt_after=50)
    state = model.to_state() | {"adapt_in": 50, "adapt_from": 5_000}
    settings = ModelSettings(
        n_clusters=3, warmup_users=300, reservoir_size=300, adapt_after=50, settle_days=0
    )
    model = SegmentModel.from_state(settings, state)
    points = groups(40, [0.0, 4.0, 8.0], random.Random(3))
    before = [model.learn_one(f"b{i}", x, 4_000 + i) for i, x in enumerate(points[:100])]
    assert not any(learned.adapted for learned in before) and model.version == 1
    after = [model.learn_one(f"a{i}", x, 5_000 + i) for i, x in enumerate(points[:50])]
    assert [learned.adapted for learned in after] == [False] * 49 + [True]
    assert model.version == 2


def test_refits_refine_the_partition_instead_of_redrawing_it() -> None:
    """Two segments over three equal groups: either pairing of the middle group is a local
    optimum. Refits on fresh draws must leave each group with the id it had (a k-means++
    redraw picks either pairing from one draw to the next, moving a third of the users)."""
    model, ids = seeded([0.0, 4.0, 8.0], n_clusters=2, refit_days=10**9)
    assert len(set(ids.values())) == 2
    for refit in range(12):
        for i, x in enumerate(groups(100, [0.0, 4.0, 8.0], random.Random(10 + refit))):
            model.learn_one(f"r{refit}-{i}", x, 1000 * (refit + 1) + i)
        model.adapt(1000 * (refit + 1) + 999, grow=False)
        assert segments_of(model, ids) == ids, f"refit {refit} moved a group"


def on_plane(x: float, y: float) -> dict[str, float]:
    """A profile on the plane of the first two features (the others 0)."""
    return dict.fromkeys(FEATURES, 0.0) | {FEATURES[0]: x, FEATURES[1]: y}


def test_a_refit_hands_each_id_the_centre_refined_from_its_anchor() -> None:
    """Lloyd's iterations start each centre at its id's anchor and move it to the data its
    id holds; pairing the results with the anchors by distance afterwards crosses ids over
    when a centre travels farther than the gap between anchors. (The sale-alone replay of
    seed 7, cut 1, swapped the lapsing customers' and the big spenders' ids that way, and
    2,772 moves came under that version.) Here the id anchored at (1, -2) holds most of the group at
    (2.5, 3) and the one at (3, -3) almost nothing: refined, the first centre goes to
    (2.5, 3) and the second to the group at (0.5, -2), moving under 100 of 400 users;
    paired by distance, they would swap ids and move over 200."""
    rng = random.Random(0)
    groups = {
        (0.5, -2.0): (1.0, 0.6, 100),
        (-2.0, 3.0): (0.3, 1.0, 100),
        (2.5, 3.0): (0.6, 0.3, 200),
    }
    points = [
        on_plane(x + rng.gauss(0, sx), y + rng.gauss(0, sy))
        for (x, y), (sx, sy, n) in groups.items()
        for _ in range(n)
    ]
    anchors = {str(i): on_plane(x, y) for i, (x, y) in enumerate([(3, -3), (1, -2), (-2, -1)])}
    state = {
        "format": CHECKPOINT_FORMAT,
        "features": list(FEATURES),
        "version": 1,
        "revision": 1,
        "next_id": 4,
        "scaler": {
            name: dict.fromkeys(FEATURES, v)
            for name, v in [("counts", 400), ("means", 0.0), ("vars", 1.0)]
        },
        "centers": anchors,
        "segments": {i: {"id": f"s{int(i) + 1}", "created_at": 0} for i in anchors},
        "anchors": anchors,
        "reference": rows(points),
        "reservoir": rows(points),
        "adapt_in": None,
        "looks": 0,
        "seeded_at": 0,
        "psi": 0.0,
    }
    settings = ModelSettings(n_clusters=3, warmup_users=400, reservoir_size=400, settle_days=0)
    model = SegmentModel.from_state(settings, state)
    before = [a.segment for a in model.assign_many(points)]
    assert model.adapt(DAY_MS, grow=False)  # a periodic refit: Lloyd's from the anchors
    after = [a.segment for a in model.assign_many(points)]
    assert {xy: model.assign(on_plane(*xy)).segment for xy in groups} == {
        (0.5, -2.0): "s1",
        (2.5, 3.0): "s2",
        (-2.0, 3.0): "s3",
    }
    moved = sum(b != a for b, a in zip(before, after, strict=True))
    assert moved <= 100  # at most the users of the group at (0.5, -2)


def test_a_refit_redraws_centres_stuck_in_a_poor_optimum_while_the_shop_settles() -> None:
    """Seeded on groups at -0.3, 0.3 and 12, the shop moves to 0, 8 and 16: refined, two
    centres would split the group at 0 and one would straddle 8 and 16 (Lloyd's stays
    there); k-means++ from scratch fits far better, so a refit takes it while the
    cold-started shop settles. Once settled, a drift's refit does not: the id of the
    group at 0.3 would go to the centre at 8, which lies nearest the anchor at 12."""

    def moved(settle_days: float) -> SegmentModel:
        model, _ = seeded(
            [-0.3, 0.3, 12.0], merge_distance=1e-6, max_clusters=3, settle_days=settle_days
        )
        for i, x in enumerate(groups(100, [0.0, 8.0, 16.0], random.Random(4))):
            model.learn_one(f"v{i}", x, 1000 + i)
        return model

    settling, settled = moved(settle_days=1), moved(settle_days=0)
    settling.adapt(2000, grow=False)  # a periodic refit, a day after seeding
    assert len(set(segments_of(settling, [0.0, 8.0, 16.0]).values())) == 3
    settled.adapt(2000)  # a drift's refit (max_clusters keeps it from adding a segment)
    assert len(set(segments_of(settled, [0.0, 8.0, 16.0]).values())) == 2


def test_a_settled_redraw_must_keep_every_id_nearest_its_own_anchor() -> None:
    anchors = {0: np.array([0.0, 0.0]), 1: np.array([10.0, 0.0]), 2: np.array([20.0, 0.0])}
    # each paired centre nearest its own anchor; the extra one (a new group) is free
    assert keeps_meaning(anchors, np.array([[1.0, 0.0], [9.0, 1.0], [21.0, 0.0], [5.0, 30.0]]))
    # the id at 10 would go to a centre nearer the anchor at 0
    assert not keeps_meaning(anchors, np.array([[0.5, 0.0], [4.0, 0.0], [21.0, 0.0]]))


def test_a_large_spread_out_newcomer_group_takes_no_old_id() -> None:
    """A new kind of shopper arrives in numbers and spread out (40 % of the reservoir,
    along a line from 20 to 40). A redrawn k-means would spend two centres on them and
    blend the groups at 0 and 3; the matching would then hand the id of 10 to the
    newcomers and the id of 3 to the group at 10. The drift's refit instead gives them a
    new id and every old id keeps its group."""
    model, ids = seeded([0.0, 3.0, 10.0])
    rng = random.Random(5)
    newcomers = [groups(1, [rng.uniform(20.0, 40.0)], rng)[0] for _ in range(120)]
    points = groups(60, [0.0, 3.0, 10.0], rng) + newcomers
    rng.shuffle(points)
    for i, x in enumerate(points):
        model.learn_one(f"v{i}", x, 1000 + i)
    model.adapt(2000)
    assert segments_of(model, ids) == ids
    assert not set(segments_of(model, [22.0, 30.0, 38.0]).values()) & set(ids.values())


def test_a_persistent_far_group_becomes_a_new_segment() -> None:
    model, ids = seeded([0.0, 4.0, 8.0])
    for i, x in enumerate(groups(75, [0.0, 4.0, 8.0, 16.0], random.Random(3))):
        model.learn_one(f"v{i}", x, 1000 + i)
    model.lifecycle.clear()
    model.adapt(2000)
    assert len(model.segments) == 4
    assert segments_of(model, ids) == ids
    new = segments_of(model, [16.0])[16.0]
    assert new not in ids.values()
    assert [(r.event, r.segment, r.model_version) for r in model.lifecycle] == [("created", new, 2)]


def test_the_new_segment_is_made_from_the_cluster_that_grew_most() -> None:
    """Newcomers arrive in a large group at 20 and a small one at 32. The k+1 fit blends
    the old groups at 10 and 11 to free a centre, so the matching pairs the id of 11
    with the large group and leaves the small one over. Made from the small one, the new
    segment would leave the large group to the id of 11, which would follow it there."""
    model, ids = seeded([0.0, 10.0, 11.0])
    rng = random.Random(8)
    points = groups(60, [0.0, 10.0, 11.0], rng) + groups(90, [20.0], rng) + groups(30, [32.0], rng)
    rng.shuffle(points)
    for i, x in enumerate(points):
        model.learn_one(f"v{i}", x, 1000 + i)
    model.adapt(2000)
    assert segments_of(model, ids) == ids
    assert not set(segments_of(model, [20.0, 32.0]).values()) & set(ids.values())


def test_after_a_drift_refit_it_looks_again_for_a_group_still_arriving() -> None:
    # quiet detectors: only the looks that follow the drift's refit can add the segment
    model, ids = seeded([0.0, 4.0, 8.0], fit_drift_delta=1e-12, feature_drift_delta=1e-12)
    rng, learned = random.Random(6), iter(range(10_000))

    def learn(points: list[dict[str, float]]) -> None:
        for x in points:
            n = next(learned)
            model.learn_one(f"v{n}", x, 1000 + n)

    # the drift's refit comes while the newcomers are too few to count (1 %)
    learn(groups(99, [0.0, 4.0, 8.0], rng) + groups(3, [16.0], rng))
    model.lifecycle.clear()
    model.adapt(1000 + next(learned))
    assert len(model.segments) == 3 and model.lifecycle == []
    version = model.version
    # a look that finds nothing new leaves the segments as they are
    learn(groups(100, [0.0, 4.0, 8.0], rng))
    assert model.version == version and len(model.segments) == 3
    # the newcomers keep arriving: the first look that sees them waits for a second one
    learn(groups(75, [0.0, 4.0, 8.0, 16.0], rng))
    assert model.version == version and len(model.segments) == 3
    # which finds them again and makes them a segment; the old ids stay put
    learn(groups(75, [0.0, 4.0, 8.0, 16.0], rng))
    new = segments_of(model, [16.0])[16.0]
    assert len(model.segments) == 4 and new not in ids.values()
    assert segments_of(model, ids) == ids
    assert [r.segment for r in model.lifecycle if r.event == "created"] == [new]
    assert model.version == version + 1


def test_a_group_arriving_where_another_left_becomes_a_new_segment() -> None:
    """At a sale, lapsing customers buy more and leave a region that buying window
    shoppers move into. Counted against every reference profile, the newcomers' region
    held 10 % before and 20 % now: only twice, like an old group that grew. The leavers'
    profiles lie where the reservoir is now empty, so they do not count."""
    model, ids = seeded([0.0, 4.0, 8.0])
    rng = random.Random(11)
    learn_all(model, groups(90, [0.0, 4.0, 8.0], rng) + groups(30, [11.0], rng), 1000, "r")
    model.adapt(2000, grow=False)  # a periodic refit: the reference is the shop before
    learn_all(model, groups(80, [0.0, 4.0, 8.0], rng) + groups(60, [11.5], rng), 3000, "s")
    model.lifecycle.clear()
    model.adapt(4000)
    assert segments_of(model, ids) == ids
    new = segments_of(model, [11.5])[11.5]
    assert new not in ids.values()
    assert [(r.event, r.segment) for r in model.lifecycle] == [("created", new)]


def test_a_group_that_shifted_a_little_gets_no_segment_of_its_own() -> None:
    """A group that moves as a whole (lapsing customers ageing) leaves one region for
    another next to it: crowded now, vacated then, like a newcomer. But the new centre
    would lie within `merge_distance` of the group's own anchor, and merge back."""
    model, ids = seeded([0.0, 4.0, 8.0])
    learn_all(model, groups(100, [0.0, 4.0, 8.3], random.Random(12)), 1000, "v")
    model.lifecycle.clear()
    model.adapt(2000)
    assert len(model.segments) == 3 and model.lifecycle == []
    assert segments_of(model, [0.0, 4.0, 8.3]) == {0.0: ids[0.0], 4.0: ids[4.0], 8.3: ids[8.0]}


def test_a_segment_just_added_is_not_split_off_again_as_its_group_matures() -> None:
    """A new group keeps changing after it got its segment (new visitors' profiles grow).
    Where it moves to is crowded and where it was is vacated, as for a newcomer; but the
    profiles found there are in a segment adaptation added less than `settle_days` ago,
    so the group keeps its one segment, which follows it."""
    model, ids = seeded([0.0, 4.0, 8.0], settle_days=1)
    rng = random.Random(13)
    learn_all(model, groups(75, [0.0, 4.0, 8.0, 16.0], rng), DAY_MS, "n")
    model.adapt(DAY_MS + 500)
    assert len(model.segments) == 4
    young = segments_of(model, [16.0])[16.0]
    learn_all(model, groups(75, [0.0, 4.0, 8.0, 19.0], rng), DAY_MS + 1000, "m")
    model.lifecycle.clear()
    model.adapt(DAY_MS + 2000)
    assert len(model.segments) == 4 and model.lifecycle == []
    assert segments_of(model, [0.0, 4.0, 8.0, 19.0]) == ids | {19.0: young}


def test_a_refit_that_adds_a_segment_takes_no_redraw() -> None:
    """One segment spans two groups (7.5 and 12.5); newcomers arrive at 23, next to the
    group at 20. A redraw would fit far better by splitting the wide segment and giving
    the newcomers to the centre at 20, each centre still nearest its own anchor; the
    matching would then hand the new id to half of the wide segment."""
    model, ids = seeded([0.0, 7.5, 12.5, 20.0], n_clusters=3)
    assert ids[7.5] == ids[12.5]
    learn_all(model, groups(60, [0.0, 7.5, 12.5, 20.0, 23.0], random.Random(1)), 1000, "v")
    model.adapt(2000)
    assert segments_of(model, ids) == ids
    assert segments_of(model, [23.0])[23.0] not in ids.values()


def test_converged_segments_merge_and_the_retired_id_is_never_reused() -> None:
    model, ids = seeded([0.0, 4.0, 8.0])
    # move the 8.0 group's centre onto the 4.0 one's, as learning does when groups merge
    index = {seg.id: i for i, seg in model.segments.items()}
    model.kmeans.centers[index[ids[8.0]]].update(model.kmeans.centers[index[ids[4.0]]])
    for i, x in enumerate(groups(100, [0.0, 4.0, 4.0], random.Random(4))):
        model.learn_one(f"v{i}", x, 1000 + i)
    model.lifecycle.clear()
    model.adapt(2000)
    assert {seg.id for seg in model.segments.values()} == {ids[0.0], ids[4.0]}
    assert [(r.event, r.segment, r.into) for r in model.lifecycle] == [
        ("merged", ids[8.0], ids[4.0])
    ]
    # a group appearing later gets a fresh id, not the retired one
    for i, x in enumerate(groups(100, [0.0, 4.0, 16.0], random.Random(5))):
        model.learn_one(f"w{i}", x, 3000 + i)
    model.adapt(4000)
    assert segments_of(model, [16.0])[16.0] not in ids.values()


def test_an_id_its_group_left_retires_rather_than_take_the_newcomers_beside_it() -> None:
    """A sale drains the window shoppers' id to a few per cent, and new visitors then
    arrive beside where they were. Refined from its anchor, the drained id's centre would
    go to the newcomers and the id would mean them (in a replay of the played-out
    schedule, `s1` went from 58 window shoppers and lapsing customers to 67 new visitors
    in one refit). It is retired instead, and the newcomers get an id of their own once
    the looks find them a group."""
    model, ids = seeded([0.0, 4.0, 8.0, 12.0], fit_drift_delta=1e-12, feature_drift_delta=1e-12)
    rng = random.Random(21)
    learn_all(model, groups(99, [0.0, 4.0, 8.0], rng) + groups(3, [12.0], rng), 1000, "r")
    model.adapt(2000, grow=False)  # the group at 12 holds 1 % of the reference now
    assert segments_of(model, ids) == ids
    arriving = groups(75, [0.0, 4.0, 8.0], rng) + groups(10, [14.0], rng)
    rng.shuffle(arriving)
    learn_all(model, arriving, 3000, "s")
    model.lifecycle.clear()
    model.adapt(4000)
    assert [(r.event, r.segment) for r in model.lifecycle] == [("retired", ids[12.0])]
    old = {c: ids[c] for c in (0.0, 4.0, 8.0)}
    assert segments_of(model, old) == old
    learn_all(model, groups(50, [0.0, 4.0, 8.0, 14.0], rng) * 3, 5000, "t")  # two looks
    new = segments_of(model, [14.0])[14.0]
    assert new not in ids.values()
    assert [r.segment for r in model.lifecycle if r.event == "created"] == [new]
    assert segments_of(model, old) == old


def test_a_small_group_that_stays_where_it_is_keeps_its_id() -> None:
    """Under `new_segment_share` of the reservoir is no reason to retire an id: a small
    group that stays put (window shoppers who have not bought yet, in a sale) is still a
    segment someone may want."""
    model, ids = seeded([0.0, 4.0, 8.0, 12.0])
    rng = random.Random(22)
    for n in range(3):
        few = groups(99, [0.0, 4.0, 8.0], rng) + groups(3, [12.0], rng)
        learn_all(model, few, 1000 * (2 * n + 1), f"r{n}-")
        model.lifecycle.clear()
        model.adapt(1000 * (2 * n + 2), grow=False)
        assert segments_of(model, ids) == ids and model.lifecycle == []


def test_membership_has_hysteresis() -> None:
    model, ids = seeded([0.0, 4.0])
    midpoint = dict.fromkeys(FEATURES, 2.0)
    a, b = ids[0.0], ids[4.0]
    nearest = model.assign(midpoint).segment
    other = b if nearest == a else a
    # at the boundary a user stays where they are, whichever side that is
    assert model.assign(midpoint, current=other).segment == other
    # clearly closer to the other centre: they move
    assert model.assign(dict.fromkeys(FEATURES, 0.5), current=b).segment == a
    assert model.assign(dict.fromkeys(FEATURES, 3.5), current=a).segment == b
    # a segment that no longer exists holds nobody
    assert model.assign(midpoint, current="s999").segment == nearest


def test_while_the_model_settles_users_follow_the_nearest_centre() -> None:
    """Refits of a settling model may still redraw what the ids mean: a margin then would
    hold users to an id's old meaning, and they would all move once it has settled."""
    model, ids = seeded([0.0, 4.0], settle_days=21)
    settled = model.to_state()["seeded_at"] + int(21 * DAY_MS)
    midpoint = dict.fromkeys(FEATURES, 2.0)
    nearest = model.assign(midpoint).segment
    other = next(i for i in ids.values() if i != nearest)
    assert model.assign(midpoint, current=other, at=settled - 1).segment == nearest
    assert model.assign(midpoint, current=other, at=settled).segment == other


def test_the_model_has_settled_once_it_learned_past_its_settling_time() -> None:
    """Not when the stream passes the settling time: a copy published before the model
    learned past it may be days older, and workers would place everyone with it. How far
    it learned travels with every publication."""
    model, _ = seeded([0.0, 4.0], settle_days=1)
    settled_at = int(model.settled_at)
    assert not model.settled
    model.learn_one("late", dict.fromkeys(FEATURES, 0.0), settled_at - 1)
    assert not model.settled
    model.learn_one("later", dict.fromkeys(FEATURES, 4.0), settled_at)
    assert model.settled
    settings = ModelSettings(n_clusters=2, settle_days=1)
    published = SegmentModel.from_state(settings, model.to_state(), learning=False)
    assert (published.learned_to, published.settled) == (settled_at, True)


def test_a_segment_adaptation_added_takes_users_without_the_margin_for_adopt_days() -> None:
    model, ids = seeded([0.0, 8.0])
    for i, x in enumerate(groups(100, [0.0, 8.0, 16.0], random.Random(3))):
        model.learn_one(f"v{i}", x, 1000 + i)
    model.adapt(2000)
    added = segments_of(model, [16.0])[16.0]
    assert added not in ids.values()
    created = next(s.created_at for s in model.segments.values() if s.id == added)
    # nearer the added segment, but not by the margin: placed before it existed, the user
    # joins it while it is new, and stays put once it is not
    x = dict.fromkeys(FEATURES, 12.5)
    assert model.assign(x, current=ids[8.0]).segment == ids[8.0]  # no event time: margin
    assert model.assign(x, current=ids[8.0], at=created + 1).segment == added
    late = created + int(7 * DAY_MS)
    assert model.assign(x, current=ids[8.0], at=late).segment == ids[8.0]
    # the seeded segments never count as added: between them the margin always holds
    midpoint = dict.fromkeys(FEATURES, 4.0)
    other = next(i for i in ids.values() if i != model.assign(midpoint).segment)
    assert model.assign(midpoint, current=other, at=created + 1).segment == other


def test_incompatible_checkpoint_is_refused(model_and_profiles) -> None:  # type: ignore[no-untyped-def]
    model, _ = model_and_profiles
    state = model.to_state()
    with pytest.raises(ValueError, match=r"model\.max_clusters"):
        SegmentModel.from_state(ModelSettings(n_clusters=2, max_clusters=4), state)
    with pytest.raises(ValueError, match="format"):
        SegmentModel.from_state(SETTINGS, {**state, "format": 99})
    with pytest.raises(ValueError, match="feature"):
        SegmentModel.from_state(SETTINGS, {**state, "features": ["x"]})


def test_distances_and_assignment_agree(model_and_profiles) -> None:  # type: ignore[no-untyped-def]
    model, profiles = model_and_profiles
    for x in list(profiles.values())[:100]:
        distances = model.distances(x)
        assignment = model.assign(x)
        assert assignment.segment == min(distances, key=distances.__getitem__)
        assert assignment.distance == pytest.approx(min(distances.values()))


def test_explain_splits_the_margin_over_the_features(model_and_profiles) -> None:  # type: ignore[no-untyped-def]
    model, profiles = model_and_profiles
    for x in list(profiles.values())[:50]:
        assignment, distances, pulls = model.explain(x)
        assert assignment == model.assign(x)
        runner_up = sorted(distances.values())[1]
        margin = runner_up**2 - assignment.distance**2
        assert sum(p.pull for p in pulls) == pytest.approx(margin, abs=1e-9)
        assert [p.pull for p in pulls] == sorted((p.pull for p in pulls), reverse=True)
        assert {p.feature for p in pulls} == set(FEATURES)


def test_segments_separate_buyers_from_non_buyers(model_and_profiles) -> None:  # type: ignore[no-untyped-def]
    model, _ = model_and_profiles
    names = [s.name for s in model.segments.values()]
    assert any("never bought" in n for n in names)
    assert any("never bought" not in n for n in names)


def test_describe_names_from_the_centroid() -> None:
    population = dict.fromkeys(FEATURES, 0.0)
    big = {
        **population,
        "orders": math.log1p(4),
        "aov": math.log1p(220),
        "purchase_recency_days": 2.0,
        "sessions": math.log1p(6),
        "price_level": math.log1p(150),
    }
    name, description = describe(
        big, {**population, "aov": 2.0, "orders": 1.5, "purchase_recency_days": -1.0}
    )
    assert name.startswith("big spenders")
    assert "frequent buyers" in name
    assert "$220" in description
    assert "last purchase 2 d before last visit" in description
    # recency at its cap means no purchase yet: the description does not date one
    browser = {**population, "orders": 0.0, "purchase_recency_days": 30.0}
    name, description = describe(browser, dict(population))
    assert name.startswith("never bought")
    assert description.startswith("no recent orders") and "last purchase" not in description
