"""What the IKE daemon holds, as last looked at, kept in step with our own actions.

A full look lists everything of ours; a scoped look asks about a few connections only, and the
cache is updated in place (a one-tunnel change among thousands must not copy thousands of
entries). After each action the cache records its effect without asking the daemon again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import replace

from ..backends.base import Backend, SaEvent
from ..model import ObservedSA, ObservedState
from ..planner import Action, Initiate, LoadConn, LoadSecret, UnloadConn, UnloadSecret, secret_digest


class ObservationCache:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._conns: dict[str, frozenset[str]] = {}
        self._secrets: set[str] = set()
        self._sas: dict[str, tuple[ObservedSA, ...]] = {}
        self.secret_digests: dict[str, str] = {}  # secret id -> digest of the PSK we last loaded
        self.daemon_id: str | None = None  # which run of the IKE daemon, as last seen in full
        self.state = ObservedState(self._conns, self._secrets, self._sas)

    def look(self, scope: Collection[str] | None) -> bool:
        """Refresh everything (scope None) or the connections in scope; raises BackendError.

        Returns true when a full look found a new run of the IKE daemon (it restarted and lost
        every SA). A scoped look that finds one of our connections gone looks at everything,
        because then the cached secrets cannot be trusted either.
        """
        if scope is None:
            fresh = self._backend.observe(None)
            self._conns, self._secrets, self._sas = dict(fresh.conns), set(fresh.shared_secrets), dict(fresh.sas)
            known, self.daemon_id = self.daemon_id, fresh.daemon_id
            restarted = None not in (known, fresh.daemon_id) and known != fresh.daemon_id
        else:
            scope = set(scope)
            fresh = self._backend.observe(scope)
            if any(name in self._conns and name not in fresh.conns for name in scope):
                return self.look(None)
            for name in scope:
                self._conns.pop(name, None)
                self._sas.pop(name, None)
            self._conns.update(fresh.conns)
            self._sas.update(fresh.sas)
            # Secrets come from the cache kept in step by record(): listing every secret id for a
            # one-tunnel change would cost O(N); a full look reads them again.
            restarted = False
        self.state = ObservedState(self._conns, self._secrets, self._sas)
        return restarted

    def look_at_sas(self, scope: Collection[str] | None) -> bool:
        """Refresh the IKE SAs of the connections in scope (None: of all), where the backend can
        list them alone (what an SA event changes: connections and secrets are kept by record() and
        checked by the full look); otherwise `look(scope)`, whose result it returns."""
        observe_sas = getattr(self._backend, "observe_sas", None)
        if observe_sas is None:
            return self.look(scope)
        if scope is None:
            self._sas = dict(observe_sas(None))
        else:
            scope = set(scope)
            fresh = observe_sas(scope)
            for name in scope:
                self._sas.pop(name, None)
            self._sas.update(fresh)
        self.state = ObservedState(self._conns, self._secrets, self._sas)
        return False

    def apply_events(self, events: Iterable[SaEvent]) -> None:
        """What the daemon's events said, in order (see SaEvent): an SA up replaces what we knew
        of it, and our own placeholder for a connection we initiated; its children stay as known
        until a child event or a look says otherwise."""
        for event in events:
            sas = self._sas.get(event.conn_name, ())
            known = next((sa for sa in sas if sa.unique_id == event.unique_id), None)
            others = tuple(sa for sa in sas if sa.unique_id != event.unique_id and (event.up is None or sa.unique_id))
            if event.up is None:
                sas = others
            else:
                children = set(known.installed_children if known is not None else ())
                if event.installed_child is not None:
                    children.add(event.installed_child)
                sas = (*others, replace(event.up, installed_children=tuple(sorted(children))))
            if sas:
                self._sas[event.conn_name] = sas
            else:
                self._sas.pop(event.conn_name, None)
        self.state = ObservedState(self._conns, self._secrets, self._sas)

    def record(self, action: Action) -> None:
        """The effect of an action that just succeeded."""
        if isinstance(action, LoadSecret):
            self._secrets.add(action.peering.secret_id or "")
            self.secret_digests[action.peering.secret_id or ""] = secret_digest(action.peering.psk)
        elif isinstance(action, UnloadSecret):
            self._secrets.discard(action.secret_id)
            self.secret_digests.pop(action.secret_id, None)
        elif isinstance(action, LoadConn):
            self._conns[action.peering.conn_name] = frozenset(child for child, _ in action.peering.children)
        elif isinstance(action, UnloadConn):
            self._conns.pop(action.conn_name, None)
            self._sas.pop(action.conn_name, None)
        elif isinstance(action, Initiate):
            if not any(sa.established for sa in self._sas.get(action.conn_name, ())):
                # Negotiating: the planner must not initiate it again before charon reports.
                self._sas[action.conn_name] = (ObservedSA(action.conn_name, "", "CONNECTING", None, ()),)
