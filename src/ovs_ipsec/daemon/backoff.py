"""Per-tunnel exponential backoff: a failing tunnel waits longer each time, the others do not wait."""

from __future__ import annotations


class Backoff:
    def __init__(self, base: float = 2.0, cap: float = 300.0) -> None:
        self._base = base
        self._cap = cap
        self._attempts: dict[str, int] = {}
        self.not_before: dict[str, float] = {}

    def failed(self, key: str, now: float) -> float:
        """Record a failed (or not yet successful) attempt; return the delay before the next one."""
        attempts = self._attempts.get(key, 0)
        delay = min(self._base * (2 ** attempts), self._cap)
        self._attempts[key] = attempts + 1
        self.not_before[key] = now + delay
        return delay

    def reset(self, key: str) -> None:
        self._attempts.pop(key, None)
        self.not_before.pop(key, None)

    def due(self, now: float) -> list[str]:
        """Keys whose wait is over; their attempt count is kept so the next failure waits longer."""
        ready = [key for key, deadline in self.not_before.items() if deadline <= now]
        for key in ready:
            del self.not_before[key]
        return ready

    def next_deadline(self) -> float | None:
        return min(self.not_before.values(), default=None)
