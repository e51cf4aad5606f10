"""Desired vs observed -> the ordered actions that converge them. Pure: `now` and memory injected.

Level-triggered, in the controller-runtime sense: the plan is computed from the current desired
and observed state of the tunnels in scope, never from the event that woke us. Only objects with
our ownership marker are ever listed in ObservedState, so nothing foreign can be planned away.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .model import AuthMethod, ObservedState, Tunnel


@dataclass(frozen=True)
class DesiredTunnel:
    """A valid tunnel with the names its backend gives it."""

    tunnel: Tunnel
    conn_name: str
    secret_id: str | None  # None: certificate tunnels have no shared secret
    children: tuple[str, ...]
    initiator: bool


@dataclass(frozen=True)
class LoadSecret:
    tunnel: Tunnel
    secret_id: str


@dataclass(frozen=True)
class UnloadSecret:
    tunnel_name: str
    secret_id: str


@dataclass(frozen=True)
class LoadConn:
    tunnel: Tunnel
    conn_name: str


@dataclass(frozen=True)
class UnloadConn:
    """Remove a connection and terminate its SAs (charon keeps SAs of an unloaded connection)."""

    tunnel_name: str
    conn_name: str


@dataclass(frozen=True)
class Initiate:
    tunnel: Tunnel
    conn_name: str
    child: str


Action = LoadSecret | UnloadSecret | LoadConn | UnloadConn | Initiate


@dataclass(frozen=True)
class Memory:
    """What the reconciler remembers between passes (it cannot be read back from the daemon)."""

    secret_digests: Mapping[str, str]  # tunnel name -> digest of the PSK last loaded
    not_before: Mapping[str, float]  # tunnel name -> no new attempt before this time (backoff)


def is_initiator(tunnel: Tunnel) -> bool:
    """The deterministic rule that keeps both ends from initiating at once.

    The end with the lower address initiates; without a local address, the end with the lower
    certificate name. A PSK tunnel without local_ip has no rule both ends can agree on, so it
    initiates only on demand (trap), like upstream.
    """
    if tunnel.local_ip:
        return ipaddress.ip_address(tunnel.local_ip) < ipaddress.ip_address(tunnel.remote_ip)
    if tunnel.auth is not AuthMethod.PSK and tunnel.local_name and tunnel.remote_name:
        return tunnel.local_name < tunnel.remote_name
    return False


def secret_digest(tunnel: Tunnel) -> str:
    return hashlib.sha256((tunnel.psk or "").encode()).hexdigest()


def plan(desired: Mapping[str, DesiredTunnel], observed: ObservedState, memory: Memory, now: float,
         scope: Collection[str] | None = None) -> tuple[Action, ...]:
    """Actions for the tunnels in scope (None: all), removals first."""
    owner_of = observed.owners
    in_scope = (lambda name: True) if scope is None else (lambda name: name in scope)
    wanted_conns = {entry.conn_name for entry in desired.values()}
    wanted_secrets = {entry.secret_id for entry in desired.values() if entry.secret_id}

    removals: list[Action] = []
    for conn in sorted(observed.conns - wanted_conns):
        tunnel_name = owner_of.get(conn, "")
        if in_scope(tunnel_name):
            removals.append(UnloadConn(tunnel_name, conn))
    for secret in sorted(observed.shared_secrets - wanted_secrets):
        tunnel_name = owner_of.get(secret, "")
        if in_scope(tunnel_name):
            removals.append(UnloadSecret(tunnel_name, secret))

    additions: list[Action] = []
    names = desired.keys() if scope is None else (name for name in scope if name in desired)
    for name in sorted(names):
        if memory.not_before.get(name, 0.0) > now:
            continue
        additions.extend(_converge(desired[name], observed, memory))
    return tuple(removals + additions)


def _converge(entry: DesiredTunnel, observed: ObservedState, memory: Memory) -> list[Action]:
    tunnel = entry.tunnel
    actions: list[Action] = []
    if entry.secret_id and (entry.secret_id not in observed.shared_secrets
                            or memory.secret_digests.get(tunnel.name) != secret_digest(tunnel)):
        actions.append(LoadSecret(tunnel, entry.secret_id))
    if entry.conn_name not in observed.conns:
        actions.append(LoadConn(tunnel, entry.conn_name))
    if entry.initiator:
        actions.extend(_initiations(entry, observed))
    return actions


def _initiations(entry: DesiredTunnel, observed: ObservedState) -> list[Initiate]:
    sas = observed.sas_of(entry.conn_name)
    if any(sa.state not in ("ESTABLISHED", "DELETING", "DESTROYING") for sa in sas):
        return []  # an IKE SA is being negotiated: wait for it
    established = [sa for sa in sas if sa.established]
    if not established:
        # The first child goes with IKE_AUTH; the others follow once the IKE SA exists.
        return [Initiate(entry.tunnel, entry.conn_name, entry.children[0])]
    installed = {child for sa in established for child in sa.installed_children}
    # Missing children are negotiated over the existing IKE SA.
    return [Initiate(entry.tunnel, entry.conn_name, child) for child in entry.children if child not in installed]
