"""An IKE daemon in memory behind the Backend contract, for unit tests of the reconcile loop.

It keeps connections, secrets and SAs the way charon does (loading a connection again replaces
its children and keeps its SAs; unloading one leaves its SAs until terminated), and can be told
to fail: `refuse` makes an action raise BackendError, `explode` any other exception.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ovs_ipsec.backends.strongswan import render
from ovs_ipsec.errors import BackendError
from ovs_ipsec.model import ObservedSA, ObservedState, Tunnel
from ovs_ipsec.planner import (
    Action,
    LoadConn,
    LoadSecret,
    Naming,
    Peering,
    TerminateChild,
    UnloadConn,
    UnloadSecret,
)


class FakeBackend:
    name = "fake"
    make_before_break = True  # as strongSwan, whose naming it uses
    naming = Naming(conn_name=render.conn_name, secret_id=render.secret_id, child_names=render.child_names,
                    child_owner=render.child_owner)

    def __init__(self) -> None:
        self.conns: dict[str, frozenset[str]] = {}
        self.secrets: dict[str, str] = {}
        self.sas: dict[str, tuple[ObservedSA, ...]] = {}
        self.applied: list[Action] = []
        self.observed: list[Collection[str] | None] = []
        self.run = 1  # which run of the daemon; a restart changes it
        self.unreachable = False
        self.refuse: Callable[[Action], bool] = lambda action: False
        self.explode: Callable[[Action], bool] = lambda action: False
        self.explode_observe = False
        self.cleaned: list[tuple[str, ...]] = []
        self._next_sa = 1

    # -- the contract --------------------------------------------------------------------------

    def observe(self, conn_names: Collection[str] | None = None) -> ObservedState:
        self.observed.append(None if conn_names is None else tuple(conn_names))
        if self.unreachable:
            raise BackendError("charon did not answer list-sas", transport=True)
        if self.explode_observe:
            raise ValueError("a parser met something it did not expect")
        scope = self.conns.keys() if conn_names is None else set(conn_names)
        return ObservedState({n: c for n, c in self.conns.items() if n in scope},
                             frozenset(self.secrets) if conn_names is None else frozenset(),
                             {n: s for n, s in self.sas.items() if n in scope},
                             daemon_id=str(self.run) if conn_names is None else None)

    def apply(self, action: Action) -> None:
        if self.unreachable:
            raise BackendError("charon did not answer", transport=True)
        if self.explode(action):
            raise RuntimeError(f"unexpected trouble with {type(action).__name__}")
        if self.refuse(action):
            raise BackendError(f"charon refused {type(action).__name__}")
        self.applied.append(action)
        if isinstance(action, LoadSecret):
            self.secrets[action.peering.secret_id] = action.peering.psk
        elif isinstance(action, UnloadSecret):
            self.secrets.pop(action.secret_id, None)
        elif isinstance(action, LoadConn):
            self.conns[action.peering.conn_name] = frozenset(child for child, _ in action.peering.children)
        elif isinstance(action, UnloadConn):
            self.conns.pop(action.conn_name, None)
            self.sas.pop(action.conn_name, None)
        elif isinstance(action, TerminateChild):
            self.sas[action.conn_name] = tuple(
                ObservedSA(sa.conn_name, sa.unique_id, sa.state, sa.established_seconds,
                           tuple(c for c in sa.installed_children if c != action.child))
                for sa in self.sas.get(action.conn_name, ()))

    def flush(self) -> dict:
        return {}  # nothing deferred, so nothing failed later

    def start_events(self, on_change) -> None:
        pass

    def cleanup_credentials(self, peerings: Collection[Peering]) -> None:
        self.cleaned.append(tuple(sorted(p.conn_name for p in peerings)))

    def not_applicable(self, tunnel: Tunnel) -> tuple[tuple[str, str], ...]:
        return render.not_applicable(tunnel.options)

    def close(self) -> None:
        pass

    # -- what the peer and the kernel would do ----------------------------------------------------

    def establish(self, conn_name: str, children: bool = True) -> str:
        """An IKE SA comes up (as initiated, or from the peer), with the connection's child SAs."""
        unique_id = str(self._next_sa)
        self._next_sa += 1
        installed = tuple(sorted(self.conns[conn_name])) if children else ()
        self.sas[conn_name] = (ObservedSA(conn_name, unique_id, "ESTABLISHED", 1, installed),)
        return unique_id

    def restart(self) -> None:
        """The daemon restarts: everything it held is gone."""
        self.conns, self.secrets, self.sas = {}, {}, {}
        self.run += 1

    def kinds(self) -> list[str]:
        return [type(action).__name__ for action in self.applied]
