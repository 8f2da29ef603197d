"""What the model learns from, and when: each active shopper once per window of event time.

Learning from every profile a poll batch changed made the model depend on how the stream
happened to be cut. In small batches, as a worker that keeps up gets them, a shopper in
the middle of a session was learned several times from half-finished sessions, and the
model settled in a worse optimum (in the replay, ARI 0.765 in batches of 500 events
against 0.852 in batches of 1,500; README, Evaluation). Here the sample depends on event
time alone: windows of `model.learn_window_minutes` tumble on event time; each user active
in a window is learned once, from their profile as of their last event in it, as soon as
that profile is final: at the user's next event if it falls in a later window, else when
the watermark passes the window's end (the quiet users, in the order of their last
events). Poll batches, the interleaving of partitions and the shop's traffic change when
that happens, not what is learned.

The watermark is the event time every input partition has reached: the least of the
partitions' latest event times, as a stream processor takes it. A worker that keeps up
reads a run of one partition before the next, so the latest event time of any one of them
can be hours ahead of the others (a window closed on it would miss the others' events).
A partition that has delivered nothing for `idle_s` seconds (a quiet purchases partition,
a stalled one) holds nothing back; an event that comes after its window closed counts
in the oldest window still open.

A window keeps at most `model.learn_window_users` users, those whose ids hash lowest (a
bottom-k sample: uniform, and the same whatever order the users come in), so memory is
bounded however many shoppers a window brings. What is final is handed out a batch's
worth at a time (`take`), so a busy window does not stall one poll batch.
"""

from __future__ import annotations

import heapq
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.profiles import MINUTE_MS, Profile

Features = Callable[[Profile], dict[str, float]]
Learnable = tuple[str, dict[str, float], int]  # user id, features, event time


@dataclass(slots=True)
class _Window:
    """The users of one window: their live profile, or None once a later event showed
    their part of the window was over (and they were learned then)."""

    members: dict[str, Profile | None] = field(default_factory=dict)  # None: learned
    highest: list[tuple[int, str]] = field(default_factory=list)  # heap of (-hash, id)


class LearningWindows:
    def __init__(
        self,
        minutes: float,
        max_users: int,
        features: Features,
        idle_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._width = max(int(minutes * MINUTE_MS), 1)
        self._max_users = max_users
        self._features = features
        self._idle_s, self._clock = idle_s, clock
        self._open: dict[int, _Window] = {}
        self._window_of: dict[str, int] = {}  # the window each member is in
        self._closed_before = 0  # windows below this one have closed
        self._partitions: dict[tuple[str, int], tuple[int, float]] = {}  # latest ts, heard at
        self._due: deque[Learnable] = deque()

    def before_fold(self, profile: Profile, event_ts: int) -> None:
        """Call before folding an event in: if it starts a later window for this user,
        what the profile was at the end of the one still open is final: learn it now."""
        window = self._window_of.get(profile.user_id)
        if window is not None and window < self._window(max(event_ts, profile.last_ts)):
            self._open[window].members[profile.user_id] = None
            del self._window_of[profile.user_id]
            self._due.append(self._learnable(profile))

    def after_fold(self, profile: Profile, event_ts: int, partition: tuple[str, int]) -> None:
        """Call after folding: the user is active in the window of their profile's clock."""
        latest, _ = self._partitions.get(partition, (event_ts, 0.0))
        latest = max(latest, event_ts)
        self._partitions[partition] = (latest, self._clock())
        if self._window(latest) > self._closed_before:  # else the watermark cannot have moved on
            self._close()
        user_id = profile.user_id
        window = max(self._window(profile.last_ts), self._closed_before)
        members = self._open.get(window)
        if members is None:  # not `setdefault`: it would build a window for every event
            members = self._open[window] = _Window()
        if user_id in members.members:
            members.members[user_id] = profile  # the cache may have reloaded it
            self._window_of[user_id] = window
            return
        rank = -zlib.crc32(user_id.encode())
        if len(members.members) >= self._max_users:
            if rank <= members.highest[0][0]:
                return  # hashes higher than every member's: not in the sample
            _, evicted = heapq.heapreplace(members.highest, (rank, user_id))
            del members.members[evicted]  # `forget` keeps heap and members in step
            if self._window_of.get(evicted) == window:
                del self._window_of[evicted]
        else:
            heapq.heappush(members.highest, (rank, user_id))
        members.members[user_id] = profile
        self._window_of[user_id] = window

    def take(self, n: int) -> list[Learnable]:
        """Up to `n` profiles to learn from, in the order they became final."""
        self._close()  # a partition may have gone quiet since the last event
        return [self._due.popleft() for _ in range(min(n, len(self._due)))]

    def _close(self) -> None:
        """Windows the watermark has passed: their users not learned yet are, in the
        order of their last events."""
        current = self._window(self.watermark())
        if current <= self._closed_before:
            return
        self._closed_before = current
        for window in sorted(w for w in self._open if w < current):
            members = self._open.pop(window).members
            quiet = [profile for profile in members.values() if profile is not None]
            for profile in quiet:
                if self._window_of.get(profile.user_id) == window:
                    del self._window_of[profile.user_id]
            closed = sorted(quiet, key=lambda profile: (profile.last_ts, profile.user_id))
            self._due.extend(map(self._learnable, closed))

    def watermark(self) -> int:
        """The event time every partition heard from in the last `idle_s` has reached."""
        now = self._clock()
        heard = [ts for ts, at in self._partitions.values() if now - at <= self._idle_s]
        return min(heard, default=max((ts for ts, _ in self._partitions.values()), default=0))

    def forget_partitions(self, partitions: set[tuple[str, int]]) -> None:
        """Revoked partitions hold nothing back any more."""
        for partition in partitions:
            self._partitions.pop(partition, None)

    def forget(self, user_id: str) -> None:
        """A deleted user: learn nothing more of them."""
        self._window_of.pop(user_id, None)
        for window in self._open.values():
            if user_id in window.members:
                del window.members[user_id]
                window.highest = [(r, u) for r, u in window.highest if u != user_id]
                heapq.heapify(window.highest)
        self._due = deque(learnable for learnable in self._due if learnable[0] != user_id)

    def clear(self) -> None:
        self._open.clear()
        self._window_of.clear()
        self._partitions.clear()
        self._due.clear()

    def __len__(self) -> int:
        """Users waiting: in open windows, or closed and not yet handed out."""
        return sum(len(w.members) for w in self._open.values()) + len(self._due)

    def _window(self, ts: int) -> int:
        return ts // self._width

    def _learnable(self, profile: Profile) -> Learnable:
        return profile.user_id, self._features(profile), profile.last_ts
