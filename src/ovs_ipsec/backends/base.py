"""The contract every IKE daemon backend fulfils, so the reconciler never knows which one it drives."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import BackendError
from ..model import ObservedSA, ObservedState, Tunnel
from ..planner import Action, Naming, Peering

# Told of every action a batch carried out or gave up on: (the action, None or why it failed).
ActionDone = Callable[[Action, "Exception | None"], None]


@dataclass(frozen=True)
class SaEvent:
    """What an event says about one IKE SA, complete enough to update the observation without
    asking the daemon: it came up (`up`, its state now), a child of it was installed
    (`installed_child`), or it is gone (neither)."""

    conn_name: str
    unique_id: str
    up: ObservedSA | None = None
    installed_child: str | None = None


class OnChange(Protocol):
    def __call__(self, conn_names: frozenset[str] | None, sa_events: Sequence[SaEvent] = ()) -> None:
        """These connections' SAs changed (None: look at everything); `sa_events`, in the order
        they happened, describe some of those changes (the others need a look)."""


class Backend(Protocol):
    name: str

    naming: Naming  # pure: how connections, secrets and children are named
    # The daemon keeps a kernel policy while any of its connections uses it, so a replacement
    # connection is loaded before the one it replaces is removed (planner.plan).
    make_before_break: bool

    def observe(self, conn_names: Collection[str] | None = None) -> ObservedState:
        """Our secrets, and our connections and their SAs, limited to `conn_names` (None: all of ours)."""

    def apply(self, action: Action) -> None:
        """Carry out one action; raises BackendError."""

    def flush(self) -> Mapping[str, BackendError]:
        """End of a batch of actions: finish what the backend deferred. Returns the connections
        whose deferred part failed (conn name -> why), so each fails alone; raises BackendError
        when the daemon is unreachable."""

    def start_events(self, on_change: OnChange) -> None:
        """Call on_change(conn names) when SAs change, on_change(None) when the daemon restarted."""

    def cleanup_credentials(self, peerings: Collection[Peering]) -> None:
        """Remove credentials we loaded (private keys, certificates) that none of `peerings` needs."""

    def not_applicable(self, tunnel: Tunnel) -> tuple[tuple[str, str], ...]:
        """The tunnel's options this IKE daemon has no setting for: (option, why), shown in status."""

    def close(self) -> None:
        ...


class PipelinedBackend(Backend, Protocol):
    """A backend that can have many actions under way at once (strongSwan: requests pipelined on
    the VICI session). The reconciler uses apply_chains when a backend has it."""

    def apply_chains(self, chains: Sequence[Sequence[Action]], done: ActionDone) -> None:
        """Carry out each chain's actions in order, an action only once the one before it in its
        chain succeeded (a connection may follow its secret at once: a refused secret still stops
        what comes after the connection); chains are independent of one another and may overlap.
        done(action, error) for every action carried out or failed (error: BackendError, or
        anything a bug raised); actions after a failure in their chain are not attempted and not
        reported. Raises BackendError (transport) when the daemon stopped answering: what was not
        reported by then did not finish."""
