"""Exponential backoff with jitter, interruptible by shutdown.

Used wherever Kafka or Redis can go away: progress pauses and retries, it never drops
an event and never crashes the process.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Stopped(Exception):
    """Shutdown was requested while waiting to retry."""


class Permanent(RuntimeError):
    """A failure no retry can mend (refused credentials, topics laid out wrongly): the
    worker exits with this message instead of retrying forever."""


class Backoff:
    def __init__(self, initial_s: float, max_s: float, stop: threading.Event) -> None:
        self._initial = initial_s
        self._max = max_s
        self._stop = stop

    def call(
        self,
        what: str,
        action: Callable[[], T],
        retry_on: tuple[type[BaseException], ...],
        on_error: Callable[[BaseException], None] = lambda _: None,
        unless: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Run `action` until it succeeds, sleeping with jitter between failures of the
        kinds in `retry_on` except those in `unless`, which are raised at once.

        A shutdown request during the wait raises `Stopped`: the work is abandoned
        uncommitted, which is safe because whoever owns the partition next replays it.
        """
        delay = self._initial
        attempt = 0
        while True:
            try:
                return action()
            except retry_on as exc:
                if isinstance(exc, unless):
                    raise
                attempt += 1
                on_error(exc)
                wait = random.uniform(delay / 2, delay)
                log.warning(
                    "%s failed (%s: %s); retry %d in %.1fs",
                    what,
                    type(exc).__name__,
                    exc,
                    attempt,
                    wait,
                )
                if self._stop.wait(wait):
                    raise Stopped(what) from exc
                delay = min(delay * 2, self._max)
