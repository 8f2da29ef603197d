"""The River model: k-means++ seeding after warm-up, stable ids, names, checkpoints."""

from __future__ import annotations

import math
import random

import orjson
import pytest

from config.settings import ModelSettings, ProfileSettings
from schemas import EVENT_ADAPTER
from worker.drift import FitDrift
from worker.features import FEATURES, FeatureExtractor
from worker.generator import generate
from worker.model import SegmentModel, describe
from worker.profiles import Position, Profile, ProfileUpdater

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


def test_checkpoint_round_trip_assigns_identically(model_and_profiles) -> None:  # type: ignore[no-untyped-def]
    model, profiles = model_and_profiles
    restored = SegmentModel.from_state(SETTINGS, orjson.loads(orjson.dumps(model.to_state())))
    assert restored.version == model.version
    for x in list(profiles.values())[:200]:
        a, b = model.assign(x), restored.assign(x)
        assert a.segment == b.segment
        assert a.distance == pytest.approx(b.distance)


def test_checkpoint_carries_the_drift_detector(model_and_profiles) -> None:  # type: ignore[no-untyped-def]
    model, _ = model_and_profiles
    state = orjson.loads(orjson.dumps(model.to_state()))
    assert len(state["drift"]["fit"]) == FitDrift.HISTORY
    restored = SegmentModel.from_state(SETTINGS, state)
    assert restored.fit_drift.to_state() == state["drift"]["fit"]
    # the restored window is the last HISTORY distances, the original may be longer
    assert restored.fit_drift.level == pytest.approx(model.fit_drift.level, rel=0.05)
    # a checkpoint written before detectors were part of it still loads
    del state["drift"]
    assert SegmentModel.from_state(SETTINGS, state).fit_drift.to_state() == []


def test_fit_detector_fires_on_a_shift_and_stays_quiet_without_one() -> None:
    rng = random.Random(3)
    detector = FitDrift()
    stationary = [detector.update(rng.gauss(1.0, 0.3)) for _ in range(20_000)]
    assert not any(stationary)
    shifted = [detector.update(rng.gauss(1.6, 0.3)) for _ in range(2000)]
    assert any(shifted[:500]), "a shift of two standard deviations went unnoticed"
    # the restored detector has the same reference: it does not fire on what it has seen
    restored = FitDrift(history=detector.to_state())
    assert not any(restored.update(rng.gauss(1.6, 0.3)) for _ in range(2000))


def test_incompatible_checkpoint_is_refused(model_and_profiles) -> None:  # type: ignore[no-untyped-def]
    model, _ = model_and_profiles
    state = model.to_state()
    with pytest.raises(ValueError, match=r"model\.n_clusters"):
        SegmentModel.from_state(ModelSettings(n_clusters=4), state)
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
    browser = {**population, "orders": 0.0, "purchase_recency_days": 60.0}
    name, _ = describe(browser, dict(population))
    assert name.startswith("never bought")
