"""The contract every IKE daemon backend fulfils, so the reconciler never knows which one it drives."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from ..model import ObservedState, Tunnel
from ..planner import Action


class Backend(Protocol):
    name: str

    def conn_name(self, tunnel: Tunnel) -> str:
        """Stable name derived from the tunnel's parameters, carrying our ownership marker."""

    def secret_id(self, tunnel: Tunnel) -> str | None:
        """Name of the tunnel's shared secret, or None when it has none."""

    def children(self, tunnel: Tunnel) -> tuple[str, ...]:
        """Names of the child SAs the tunnel needs, the one negotiated with the IKE SA first."""

    def observe(self, conn_names: Collection[str] | None = None) -> ObservedState:
        """Our connections and secrets, and the SAs of `conn_names` (None: of all of ours)."""

    def apply(self, action: Action) -> None:
        """Carry out one action; raises BackendError."""

    def start_events(self, on_change: Callable[[frozenset[str] | None], None]) -> None:
        """Call on_change(conn names) when SAs change, on_change(None) when the daemon restarted."""

    def cleanup_credentials(self, keep_keys: Collection[bytes]) -> None:
        """Unload private keys we loaded that are no longer needed."""

    def close(self) -> None:
        ...
