"""Desired vs observed -> the ordered actions that converge them. Pure: `now` and memory injected.

The unit of IKE work is a *peering*: every tunnel between the same two endpoints with the same
authentication shares one IKE connection, and each tunnel adds its own child SAs. (Two IKE
connections with identical identities cannot coexist: the responder would pick one of them for
both, and refuse the other's traffic selectors.) Adding or removing a tunnel changes only its
own children; the peering's IKE SA and the other tunnels' child SAs stay up.

Level-triggered, in the controller-runtime sense: the plan is computed from the current desired
and observed state of the peerings in scope, never from the event that woke us. Only objects
with our ownership marker are ever observed, so nothing foreign can be planned away.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Collection, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

from .model import AuthMethod, Invalid, ObservedState, Tunnel


@dataclass(frozen=True, slots=True)  # one per tunnel: no __dict__ each
class Peering:
    """One IKE connection and the tunnels that share it."""

    conn_name: str
    secret_id: str | None  # None: certificate peerings have no shared secret
    tunnels: tuple[Tunnel, ...]  # sorted by name
    children: tuple[tuple[str, str], ...]  # (child name, tunnel name), in initiation order
    initiator: bool

    @property
    def psk(self) -> str | None:
        return self.tunnels[0].psk

    def children_of(self, tunnel_name: str) -> tuple[str, ...]:
        return tuple(child for child, owner in self.children if owner == tunnel_name)


@dataclass(frozen=True)
class Naming:
    """How a backend names things; pure functions, so the planner stays backend-neutral."""

    conn_name: Callable[[Tunnel], str]  # equal for tunnels that can share an IKE connection
    secret_id: Callable[[Tunnel], str | None]
    child_names: Callable[[Tunnel], tuple[str, ...]]
    child_owner: Callable[[str], str | None]  # the tunnel a child name of ours was made for


@dataclass(frozen=True)
class LoadSecret:
    peering: Peering


@dataclass(frozen=True)
class UnloadSecret:
    secret_id: str


@dataclass(frozen=True)
class LoadConn:
    """Load or update the connection: charon replaces children in place, keeping the SAs."""

    peering: Peering


@dataclass(frozen=True)
class UnloadConn:
    """Remove a connection and terminate its SAs (charon keeps SAs of an unloaded connection)."""

    conn_name: str


@dataclass(frozen=True)
class TerminateChild:
    """End a child SA whose tunnel left a peering that stays."""

    conn_name: str
    child: str


@dataclass(frozen=True)
class Initiate:
    conn_name: str
    child: str


Action = LoadSecret | UnloadSecret | LoadConn | UnloadConn | TerminateChild | Initiate


@dataclass(frozen=True)
class Memory:
    """What the reconciler remembers between passes (it cannot be read back from the daemon)."""

    secret_digests: Mapping[str, str]  # secret id -> digest of the PSK last loaded
    not_before: Mapping[str, float]  # conn name -> no new attempt before this time (backoff)
    # Responder connections that initiate too: our IKE daemon restarted and lost their SAs, which
    # the peer still believes in (it would notice only when DPD gives up, a minute or more later).
    takeover: AbstractSet[str] = frozenset()
    # Connections and secrets never to remove although unwanted: they serve a tunnel that is
    # invalid now and has no configuration in force (the monitor restarted since it was valid).
    protected: AbstractSet[str] = frozenset()
    # conn name -> children we initiated whose retry delay has not run out: an IKE SA coming up
    # does not make them worth asking for again at once (one that failed with it would fail again;
    # on a kernel without ESP every one does, and each retry is a Diffie-Hellman on both ends).
    tried: Mapping[str, AbstractSet[str]] = field(default_factory=dict)
    # conn name -> the peering last loaded for it, while the daemon is the same: a replacement
    # of some of its children can then be made before the old ones break (see _converge).
    loaded: Mapping[str, Peering] = field(default_factory=dict)


def protected_conns(observed: ObservedState, tunnels: AbstractSet[str], naming: Naming,
                    scope: Collection[str] | None = None) -> frozenset[str]:
    """The observed connections (in `scope`, None: all) with a child made for one of `tunnels`
    (see Memory.protected)."""
    if not tunnels:
        return frozenset()
    conns = observed.conns.keys() if scope is None else [conn for conn in scope if conn in observed.conns]
    return frozenset(conn for conn in conns if any(naming.child_owner(child) in tunnels
                                                  for child in observed.conns[conn]))


def is_initiator(tunnel: Tunnel) -> bool:
    """The deterministic rule that keeps both ends from initiating at once.

    The end with the lower address initiates; without a local address, the end with the lower
    certificate name. A PSK tunnel without local_ip has no rule both ends can agree on, so it
    initiates only on demand (trap), like upstream.
    """
    if tunnel.local_ip:
        return _packed(tunnel.local_ip) < _packed(tunnel.remote_ip)
    if tunnel.auth is not AuthMethod.PSK and tunnel.local_name and tunnel.remote_name:
        return tunnel.local_name < tunnel.remote_name
    return False


def _packed(address: str) -> bytes:
    """Network-order bytes: compares like the numbers, and is far cheaper than ipaddress here."""
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def secret_digest(psk: str | None) -> str:
    return hashlib.sha256((psk or "").encode()).hexdigest()


def group_peerings(tunnels: Collection[Tunnel], naming: Naming) -> tuple[dict[str, Peering], tuple[Invalid, ...]]:
    """Group valid tunnels by IKE connection; a tunnel whose PSK disagrees with its peering's is invalid."""
    groups: dict[str, list[Tunnel]] = {}
    first_by_endpoints: dict[tuple, Tunnel] = {}
    invalid: list[Invalid] = []
    for tunnel in sorted(tunnels, key=lambda t: t.name):
        conn_name = naming.conn_name(tunnel)
        first = first_by_endpoints.setdefault((tunnel.local_ip, tunnel.remote_ip), tunnel)
        if first is not tunnel and naming.conn_name(first) != conn_name:
            problem = "its authentication or IKE options differ from"
        elif first is not tunnel and first.psk != tunnel.psk:
            problem = "its 'psk' differs from"
        else:
            groups.setdefault(conn_name, []).append(tunnel)
            continue
        invalid.append(Invalid(tunnel.name, f"{problem} tunnel '{first.name}' to the same peer; tunnels between "
                               "the same two hosts share one IKE SA and must agree on it",
                               tunnel.type.value, tunnel.local_ip, tunnel.remote_ip, tunnel.auth))
    peerings = {}
    for conn_name, members in groups.items():
        children = tuple((child, t.name) for t in members for child in naming.child_names(t))
        peerings[conn_name] = Peering(conn_name, naming.secret_id(members[0]), tuple(members), children,
                                      is_initiator(members[0]))
    return peerings, tuple(invalid)


def plan(desired: Mapping[str, Peering], observed: ObservedState, memory: Memory, now: float,
         scope: Collection[str] | None = None, wanted_secrets: AbstractSet[str] | None = None,
         make_before_break: bool = False) -> tuple[Action, ...]:
    """Actions for the connections in scope (None: all): removals, then loads, then initiations
    (removals last with `make_before_break`; every connection and secret of the batch is in place
    before the first IKE packet leaves, and a backend that must reload its secrets does so once per
    batch, not once per tunnel).

    `make_before_break`: removals last, for an IKE daemon that keeps a kernel policy while any of
    its connections uses it. A connection replaced by another (new parameters, new default
    proposals after an upgrade) then never leaves its traffic without a trap policy: removed
    first, the tunnel had none until its replacement was in, and sent plaintext meanwhile. The
    replacement is initiated before the old connection goes, so its SAs can take over the traffic.

    `wanted_secrets`: the secret ids of every desired peering, when the caller keeps them (a scoped
    plan then costs what its scope holds, not what the desired state holds)."""
    if wanted_secrets is None:
        wanted_secrets = {p.secret_id for p in desired.values() if p.secret_id}
    conns: Collection[str]
    secrets: Collection[str]
    if scope is None:
        conns, secrets = observed.conns.keys(), observed.shared_secrets
    else:
        conns = [name for name in scope if name in observed.conns]
        secrets = [name for name in scope if name in observed.shared_secrets]

    # Secrets first: whoever sees one of our connections gone sees its secret gone too (the other
    # order left a secret without its connection between two requests, which a watcher could see).
    removals: list[Action] = [UnloadSecret(secret) for secret in sorted(secrets)
                              if secret not in wanted_secrets and secret not in memory.protected]
    removals += [UnloadConn(conn) for conn in sorted(conns)
                 if conn not in desired and conn not in memory.protected]

    additions: list[Action] = []
    initiations: list[Action] = []
    names = desired.keys() if scope is None else (name for name in scope if name in desired)
    for name in sorted(names):
        if memory.not_before.get(name, 0.0) > now:
            continue
        for action in _converge(desired[name], observed, memory, make_before_break):
            (initiations if isinstance(action, Initiate) else additions).append(action)
    if make_before_break:
        return tuple(additions + initiations + removals)
    return tuple(removals + additions + initiations)


def _converge(peering: Peering, observed: ObservedState, memory: Memory, make_before_break: bool) -> list[Action]:
    actions: list[Action] = []
    if peering.secret_id and (peering.secret_id not in observed.shared_secrets
                              or memory.secret_digests.get(peering.secret_id) != secret_digest(peering.psk)):
        actions.append(LoadSecret(peering))
    wanted_children = {child for child, _ in peering.children}
    loaded_children = observed.conns.get(peering.conn_name)
    if loaded_children != frozenset(wanted_children):
        previous = memory.loaded.get(peering.conn_name)
        if make_before_break and loaded_children and loaded_children - wanted_children and previous is not None \
                and loaded_children == {child for child, _ in previous.children}:
            # A daemon that replaces a connection's children in place takes the old ones' traps out
            # before it puts the new ones in. So first the old and the new children together (no
            # child goes: identical policies just gain a user), then the new ones alone.
            actions.append(LoadConn(with_children_of(peering, previous)))
        actions.append(LoadConn(peering))
    sas = observed.sas_of(peering.conn_name)
    installed = {child for sa in sas for child in sa.installed_children}
    actions += [TerminateChild(peering.conn_name, child) for child in sorted(installed - wanted_children)]
    if peering.initiator or peering.conn_name in memory.takeover:
        actions += _initiations(peering, sas, installed, memory.tried.get(peering.conn_name, frozenset()))
    return actions


def with_children_of(peering: Peering, previous: Peering) -> Peering:
    """`peering` that also holds `previous`'s children (child names carry a digest of what they
    render, so a child of the same name is the same child)."""
    names = {child for child, _ in peering.children}
    return replace(peering, tunnels=peering.tunnels + previous.tunnels,
                   children=peering.children + tuple(entry for entry in previous.children if entry[0] not in names))


def _initiations(peering: Peering, sas, installed: set[str], tried: AbstractSet[str]) -> list[Initiate]:
    if any(sa.state not in ("ESTABLISHED", "DELETING", "DESTROYING") for sa in sas):
        return []  # an IKE SA is being negotiated: wait for it
    if not any(sa.established for sa in sas):
        # The first child goes with IKE_AUTH; the others follow once the IKE SA exists.
        return [Initiate(peering.conn_name, peering.children[0][0])]
    return [Initiate(peering.conn_name, child) for child, _ in peering.children
            if child not in installed and child not in tried]
