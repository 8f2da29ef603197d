"""The model's sample: each active user once per window of event time, however the stream
is cut into batches."""

from __future__ import annotations

import zlib

import pytest

from config.settings import ProfileSettings
from schemas.events import EVENT_ADAPTER, ClickEvent, PurchaseEvent
from worker.features import FeatureExtractor
from worker.generator import generate
from worker.learning import Learnable, LearningWindows
from worker.profiles import MINUTE_MS, Position, Profile, ProfileUpdater

HOUR = 60 * MINUTE_MS
T0 = 1_790_000_000_000 // HOUR * HOUR  # on a window boundary


def events_seen(profile: Profile) -> dict[str, float]:
    return {"events": round(sum(profile.counts.values()), 3)}  # decay: a whisker under


def view(user: str, ts: int) -> ClickEvent:
    return ClickEvent(
        event_id=f"{user}-{ts}",
        event_type="page_view",
        user_id=user,
        timestamp=ts,  # type: ignore[arg-type]
    )


class Stream:
    """Profiles folded from events, with the windows watching, as the worker does it."""

    def __init__(self, minutes: float = 60, users: int = 10_000, features=events_seen) -> None:  # type: ignore[no-untyped-def]
        self.updater = ProfileUpdater(ProfileSettings(half_life_days=10_000))
        self.windows = LearningWindows(minutes, users, features)
        self.profiles: dict[str, Profile] = {}

    def fold(
        self, events: list[ClickEvent | PurchaseEvent], take: int = 10**9, partition: int = 0
    ) -> list[Learnable]:
        """Fold a batch from one partition; what became final to learn, up to `take`."""
        for offset, event in enumerate(events):
            profile = self.profiles.setdefault(event.user_id, Profile(event.user_id))
            self.windows.before_fold(profile, event.timestamp)
            self.updater.apply(profile, event, Position("t", partition, offset))
            self.windows.after_fold(profile, event.timestamp, ("t", partition))
        return self.windows.take(take)


def test_a_window_gives_each_user_once_from_their_last_event_in_it() -> None:
    stream = Stream()
    # "a" (partition 0) is active twice in the first hour, then in the second; "b"
    # (partition 1) keeps the watermark in the first hour
    assert stream.fold([view("a", T0), view("a", T0 + 10 * MINUTE_MS)]) == []
    assert stream.fold([view("b", T0 + 20)], partition=1) == []
    # a's next event shows a's first hour is over: learned now, as that hour left it
    assert stream.fold([view("a", T0 + 70 * MINUTE_MS)]) == [
        ("a", {"events": 2.0}, T0 + 10 * MINUTE_MS)
    ]
    # b's partition passes the hour: the window closes, b is learned, not a again
    assert stream.fold([view("c", T0 + 65 * MINUTE_MS)], partition=1) == [
        ("b", {"events": 1.0}, T0 + 20)
    ]
    assert len(stream.windows) == 2  # "a" and "c" in the second hour, until it closes


@pytest.mark.parametrize("batch", [1, 7, 500])
def test_the_sample_does_not_depend_on_how_the_stream_is_cut(batch: int) -> None:
    shop = generate(users=200, events=6_000, seed=3)
    events: list[ClickEvent | PurchaseEvent] = [
        EVENT_ADAPTER.validate_python(e)  # type: ignore[misc]
        for e in shop.events
    ]
    features = FeatureExtractor(ProfileSettings())
    whole = Stream(120, features=features).fold(events)
    stream = Stream(120, features=features)
    cut = [
        x
        for start in range(0, len(events), batch)
        for x in stream.fold(events[start : start + batch])
    ]
    assert len(whole) > 500
    assert cut == whole


def test_a_deleted_user_is_not_learned() -> None:
    stream = Stream()
    stream.fold([view("a", T0), view("b", T0 + 1)])
    stream.windows.forget("a")
    assert [user for user, _, _ in stream.fold([view("b", T0 + 2 * HOUR)])] == ["b"]


def test_nothing_is_learned_until_the_event_time_passes_the_window() -> None:
    stream = Stream()
    assert stream.fold([view("a", T0 + n * MINUTE_MS) for n in range(60)]) == []
    assert [user for user, _, _ in stream.fold([view("b", T0 + HOUR)])] == ["a"]


def test_a_crowded_window_keeps_the_same_sample_whatever_the_order() -> None:
    crowd = [view(f"u{n}", T0 + n) for n in range(50)]
    later = view("z", T0 + HOUR)
    learned = Stream(users=10).fold([*crowd, later])
    backwards = Stream(users=10).fold([*crowd[::-1], later])
    assert len(learned) == 10
    assert {user for user, _, _ in backwards} == {user for user, _, _ in learned}


def test_a_busy_window_is_handed_out_a_batch_at_a_time() -> None:
    stream = Stream()
    stream.fold([view(f"u{n}", T0 + n) for n in range(25)])
    first = stream.fold([view("z", T0 + HOUR)], take=10)
    assert len(first) == 10 and len(stream.windows) == 16  # 15 due, "z" in its window
    rest = stream.fold([], take=100)
    assert [user for user, _, _ in first + rest] == [f"u{n}" for n in range(25)]


def test_a_window_closes_when_every_partition_has_passed_it() -> None:
    now = [0.0]
    windows = LearningWindows(60, 100, events_seen, idle_s=5, clock=lambda: now[0])
    updater, profiles = ProfileUpdater(ProfileSettings()), {}

    def fold(event: ClickEvent, partition: int) -> list[str]:
        profile = profiles.setdefault(event.user_id, Profile(event.user_id))
        windows.before_fold(profile, event.timestamp)
        updater.apply(profile, event, Position("t", partition, 0))
        windows.after_fold(profile, event.timestamp, ("t", partition))
        return [user for user, _, _ in windows.take(100)]

    assert fold(view("a", T0), 0) == []
    assert fold(view("b", T0 + 3 * HOUR), 1) == []  # partition 0 is still in the first hour
    assert fold(view("c", T0 + 5 * MINUTE_MS), 0) == []
    assert fold(view("d", T0 + 2 * HOUR), 0) == ["a", "c"]  # both partitions past it
    now[0] = 10.0  # partition 1 has been quiet for longer than idle_s: it holds nothing
    assert fold(view("e", T0 + 3 * HOUR), 0) == ["d"]
    # a late event (partition 1 comes back with the first hour) counts in the oldest
    # window still open, so it is learned, once, when that one closes
    assert fold(view("f", T0 + 10 * MINUTE_MS), 1) == []
    assert windows.watermark() == T0 + 3 * HOUR  # a partition's clock does not go back
    assert fold(view("g", T0 + 5 * HOUR), 1) == []
    assert fold(view("h", T0 + 5 * HOUR), 0) == ["f", "b", "e"]


def test_forgetting_a_user_already_learned_keeps_the_sample_whole() -> None:
    def crc(user: str) -> int:
        return zlib.crc32(user.encode())

    ids = sorted((f"u{n}" for n in range(200)), key=crc)
    low, gone = ids[:20], ids[-1]  # the one forgotten hashes highest: first to be evicted
    stream = Stream(users=3)
    stream.fold([view(low[0], T0), view(low[1], T0 + 1)], partition=1)  # holds the watermark
    stream.fold([view(gone, T0 + 2), view(gone, T0 + HOUR + 3)])  # its first hour: learned
    stream.windows.forget(gone)
    stream.fold([view(user, T0 + 10 + n) for n, user in enumerate(low[2:])], partition=1)
    closed = stream.fold([view("z", T0 + 3 * HOUR)], partition=1)
    assert [user for user, _, _ in closed] == low[:3]  # the sample: the three lowest hashes
