"""What the model learns from, and when: each active shopper once per window of event time.

Learning from every profile a poll batch changed made the model depend on how the stream
happened to be cut. In small batches, as a worker that keeps up gets them, a shopper in
the middle of a session was learned several times from half-finished sessions, and the
model settled in a worse optimum (in the replay, ARI 0.765 in batches of 500 events
against 0.852 in batches of 1,500; README, Evaluation). Here the sample depends on event
time alone: windows of `model.learn_window_minutes` tumble on event time; each user active
in a window is learned once, from their profile as of their last event in it, when the
watermark (the latest event time applied) passes the window's end. Poll batches, the
interleaving of partitions and the shop's traffic change when that happens, not what is
learned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from worker.profiles import MINUTE_MS, Profile

Features = Callable[[Profile], dict[str, float]]
Learnable = tuple[str, dict[str, float], int]  # user id, features, event time


class LearningWindows:
    def __init__(self, minutes: float, features: Features) -> None:
        self._width = max(int(minutes * MINUTE_MS), 1)
        self._features = features
        # per open window, its users: the live profile, or what it was when the window
        # ended for a user whose later events are already folded in
        self._open: dict[int, dict[str, Profile | Learnable]] = {}
        self._window_of: dict[str, int] = {}
        self._watermark = 0

    def before_fold(self, profile: Profile, event_ts: int) -> None:
        """Call before folding an event in: if it starts a later window for this user,
        keep what the profile was at the end of the one still open."""
        window = self._window_of.get(profile.user_id)
        if window is not None and window < self._window(max(event_ts, profile.last_ts)):
            members = self._open.get(window)
            if members is not None:
                members[profile.user_id] = self._learnable(profile)

    def after_fold(self, profile: Profile) -> None:
        """Call after folding: the user is active in the window of their profile's clock."""
        window = self._window(profile.last_ts)
        self._window_of[profile.user_id] = window
        self._open.setdefault(window, {})[profile.user_id] = profile  # the cache may reload it
        self._watermark = max(self._watermark, profile.last_ts)

    def closed(self) -> Iterator[Learnable]:
        """What to learn from the windows the watermark has passed, oldest first."""
        current = self._window(self._watermark)
        for window in sorted(w for w in self._open if w < current):
            for user_id, member in self._open.pop(window).items():
                if self._window_of.get(user_id) == window:
                    del self._window_of[user_id]
                yield member if isinstance(member, tuple) else self._learnable(member)

    def forget(self, user_id: str) -> None:
        """A deleted user: learn nothing more of them."""
        self._window_of.pop(user_id, None)
        for members in self._open.values():
            members.pop(user_id, None)

    def clear(self) -> None:
        self._open.clear()
        self._window_of.clear()

    def __len__(self) -> int:
        """Users waiting in open windows."""
        return sum(map(len, self._open.values()))

    def _window(self, ts: int) -> int:
        return ts // self._width

    def _learnable(self, profile: Profile) -> Learnable:
        return profile.user_id, self._features(profile), profile.last_ts
