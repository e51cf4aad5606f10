"""Which connections need a look, and when: dirty keys, per-key backoff, takeovers, the full resync.

Pure, in the controller-runtime sense of a rate-limited work queue: every method takes `now`, and
nothing here sleeps, reads a clock or starts a thread, so a unit test drives it with plain numbers.
A key is a connection (or secret) name. A failing key waits longer each time; the others do not
wait at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
# When the IKE daemon is unreachable, look at everything again this soon (not at once, which would
# spin while it is down).
UNREACHABLE_RETRY = 5.0


@dataclass(frozen=True)
class Work:
    """What one pass must do: compare everything (`full`) or only `keys`."""

    full: bool
    keys: frozenset[str]
    takeovers: frozenset[str] = frozenset()  # responder connections whose takeover delay ended


class WorkQueue:
    def __init__(self, resync_interval: float, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> None:
        self.resync_interval = resync_interval
        self._base = base
        self._cap = cap
        self._dirty: set[str] = set()
        self._attempts: dict[str, int] = {}
        self.not_before: dict[str, float] = {}  # key -> no new attempt before this time
        self._takeover_at: dict[str, float] = {}
        self._full_at = 0.0  # a full comparison is due at this time; the first pass is always one

    # -- adding work ----------------------------------------------------------------------------

    def add(self, keys: Iterable[str]) -> None:
        self._dirty.update(keys)

    def request_full(self, now: float, delay: float = 0.0) -> None:
        self._full_at = min(self._full_at, now + delay)

    def schedule_takeovers(self, keys: Iterable[str], at: float) -> None:
        self._takeover_at.update((key, at) for key in keys)

    def cancel_takeover(self, key: str) -> None:
        self._takeover_at.pop(key, None)

    # -- taking work ----------------------------------------------------------------------------

    def take(self, now: float) -> Work:
        """Everything due now; the keys leave the queue (their attempt counts stay)."""
        due = {key for key, deadline in self.not_before.items() if deadline <= now}
        for key in due:
            del self.not_before[key]
        takeovers = {key for key, deadline in self._takeover_at.items() if deadline <= now}
        for key in takeovers:
            del self._takeover_at[key]
        keys = frozenset(self._dirty | due | takeovers)
        self._dirty = set()
        full = now >= self._full_at
        if full:
            self._full_at = now + self.resync_interval  # unless the pass fails (requeue, unreachable)
        return Work(full, keys, frozenset(takeovers))

    def has_work(self, now: float) -> bool:
        return bool(self._dirty) or self.next_deadline() <= now

    def next_deadline(self) -> float:
        deadlines = [self._full_at, *self.not_before.values(), *self._takeover_at.values()]
        return min(deadlines)

    # -- outcomes -------------------------------------------------------------------------------

    def resynced(self) -> None:
        """A full comparison completed: a later failure of one starts its backoff afresh."""
        self.reset(_FULL)

    def failed(self, key: str, now: float) -> float:
        """Record a failed (or not yet successful) attempt; return the delay before the next one."""
        attempts = self._attempts.get(key, 0)
        delay = min(self._base * (2 ** attempts), self._cap)
        self._attempts[key] = attempts + 1
        self.not_before[key] = now + delay
        return delay

    def reset(self, key: str) -> None:
        """Progress, or a new desired form: the key's next attempt may happen at once."""
        self._attempts.pop(key, None)
        self.not_before.pop(key, None)

    def requeue(self, work: Work, now: float) -> float:
        """A pass failed unexpectedly: retry its keys, and the full comparison it was, with backoff.
        Returns the longest delay, for the log."""
        delays = [self.failed(key, now) for key in work.keys]
        if work.full:
            delays.append(self.failed(_FULL, now))
            self._full_at = self.not_before.pop(_FULL)
        return max(delays, default=0.0)

    def unreachable(self, now: float) -> None:
        """The IKE daemon did not answer: compare everything once it is back."""
        self.request_full(now, min(UNREACHABLE_RETRY, self.resync_interval))

    def waiting(self) -> int:
        """Keys waiting for their backoff delay (a metric)."""
        return len(self.not_before)


_FULL = "\0full"  # the full comparison's own backoff counter; no connection name contains NUL
