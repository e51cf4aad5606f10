"""Per-tunnel status, computed once per reconcile pass and read by every status query.

Pure: validated tunnels, observed SAs and recorded errors in, a frozen snapshot out. Queries
(unixctl, `ovs-ipsec status`, metrics) read the last snapshot and never run a command.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ..guard.policy import GuardStatus
from ..model import GlobalConfig, Invalid, ObservedState, Tunnel, TunnelState, ValidatedState
from ..planner import Peering
from ..validate import CertificateFacts


@dataclass(frozen=True)
class TunnelStatus:
    name: str
    type: str
    local_ip: str | None
    remote_ip: str | None
    auth: str | None
    state: TunnelState
    reason: str | None
    ike_sas: int = 0
    child_sas: int = 0
    since: float | None = None  # when the tunnel entered this state
    conn: str | None = None
    initiator: bool | None = None
    remote_name: str | None = None
    local_name: str | None = None
    remote_cert: bool = False
    dst_port: int | None = None
    options: tuple[tuple[str, str], ...] = ()  # the ipsec_* options in force, canonical
    ignored_options: tuple[tuple[str, str], ...] = ()  # (key, why): set, but with no effect here
    # While the tunnel is invalid: since when its last good configuration has been kept in force.
    last_good_since: float | None = None
    encrypting: bool = False  # every child SA of the tunnel is installed
    installed_children: tuple[str, ...] = ()  # the tunnel's children with an installed child SA
    ofport: int | None = None
    cfm_fault: bool | None = None
    sa_lines: tuple[str, ...] = ()
    # History, carried from one snapshot to the next (see `_with_history`); counters start at the
    # monitor's start, as Prometheus counters do.
    ike_sa_ids: tuple[str, ...] = ()  # unique ids of the established IKE SAs, newest first
    established_at: float | None = None  # when the newest established IKE SA came up
    rekeys: int = 0  # an established IKE SA replaced by a new one (rekey or reauthentication)
    failures: int = 0  # entered `error`, or lost its IKE SA while established

    def as_json(self) -> dict:
        return {
            "name": self.name, "type": self.type, "local_ip": self.local_ip, "remote_ip": self.remote_ip,
            "auth": self.auth, "state": self.state.value, "reason": self.reason,
            "ike_sas": self.ike_sas, "child_sas": self.child_sas, "since": self.since,
            "conn": self.conn, "initiator": self.initiator, "remote_name": self.remote_name,
            "dst_port": self.dst_port, "ofport": self.ofport,
            "established_at": self.established_at, "rekeys": self.rekeys, "failures": self.failures,
            "encrypting": self.encrypting, "last_good_since": self.last_good_since,
            "options": dict(self.options),
            "ignored_options": [{"key": key, "why": why} for key, why in self.ignored_options],
        }


@dataclass(frozen=True)
class CertificateStatus:
    """A certificate file in use and when it ends (no key material: paths and names only)."""

    path: str
    role: str  # "local" (other_config:certificate) | "ca" (other_config:ca_cert) | "peer" (remote_cert)
    cn: str | None
    not_after: float | None
    error: str | None

    def as_json(self) -> dict:
        return {"path": self.path, "role": self.role, "cn": self.cn, "not_after": self.not_after,
                "error": self.error}


@dataclass(frozen=True)
class ReconcileStats:
    """How the worker is doing: for metrics, filled in by the reconciler when it publishes."""

    passes: int = 0
    last_pass_seconds: float = 0.0
    total_pass_seconds: float = 0.0
    last_full_resync: float | None = None  # when charon was last compared in full
    retry_waiting: int = 0  # connections waiting for their backoff delay
    error: str | None = None  # why the last pass failed unexpectedly (it is retried)
    errors: int = 0  # passes that failed unexpectedly since the monitor started

    def after_pass(self, seconds: float, last_full_resync: float | None, retry_waiting: int,
                   error: str | None = None) -> ReconcileStats:
        return ReconcileStats(self.passes + 1, seconds, self.total_pass_seconds + seconds, last_full_resync,
                              retry_waiting, error, self.errors + (error is not None and error != self.error))

    def as_json(self) -> dict:
        return {"passes": self.passes, "last_pass_seconds": self.last_pass_seconds,
                "last_full_resync": self.last_full_resync, "retry_waiting": self.retry_waiting,
                "error": self.error, "errors": self.errors}


@dataclass(frozen=True)
class StatusSnapshot:
    tunnels: tuple[TunnelStatus, ...]
    global_config: GlobalConfig
    ike_daemon_error: str | None
    taken_at: float | None
    certificates: tuple[CertificateStatus, ...] = ()
    reconcile: ReconcileStats = ReconcileStats()
    guard: GuardStatus = GuardStatus()  # the plaintext guard (other_config:ipsec_skb_mark)

    @classmethod
    def empty(cls) -> StatusSnapshot:
        return cls((), GlobalConfig(), None, None)

    def as_json(self) -> dict:
        return {
            "tunnels": [tunnel.as_json() for tunnel in self.tunnels],
            "ike_daemon": {"reachable": self.ike_daemon_error is None, "error": self.ike_daemon_error},
            "skb_mark": self.global_config.skb_mark,
            "taken_at": self.taken_at,
            "certificates": [certificate.as_json() for certificate in self.certificates],
            "reconcile": self.reconcile.as_json(),
            "guard": self.guard.as_json(),
        }


def build_snapshot(validated: ValidatedState, peerings: Mapping[str, Peering], observed: ObservedState,
                   errors: Mapping[str, str], daemon_error: str | None, global_config: GlobalConfig,
                   previous: StatusSnapshot, now: float, certificates: tuple[CertificateStatus, ...] = (),
                   reconcile: ReconcileStats = ReconcileStats(), memo: dict | None = None,
                   not_applicable: Callable[[Tunnel], tuple[tuple[str, str], ...]] = lambda tunnel: ()
                   ) -> StatusSnapshot:
    """The status of every tunnel. `memo` (owned by the caller) reuses a tunnel's previous status
    while everything it is computed from is the very same, so one change among thousands of
    tunnels costs one status, not thousands. `not_applicable` names the options the backend has
    no setting for. A tunnel kept at its last good configuration is `invalid`, with its SAs."""
    memo = {} if memo is None else memo
    before = {tunnel.name: tunnel for tunnel in previous.tunnels}
    reasons = {invalid.name: invalid.reason for invalid in validated.invalid}
    stamped = [_stamp(_invalid_status(invalid), before.get(invalid.name), now) for invalid in validated.invalid
               if invalid.name not in validated.kept]
    seen = set()
    for peering in peerings.values():
        sas, loaded, error = observed.sas_of(peering.conn_name), peering.conn_name in observed.conns, \
            errors.get(peering.conn_name)
        for tunnel in peering.tunnels:
            kept = (reasons[tunnel.name], validated.kept[tunnel.name]) if tunnel.name in validated.kept else None
            key = (tunnel, peering, sas, loaded, error, daemon_error, kept)
            cached = memo.get(tunnel.name)
            if cached is None or cached[0] != key or before.get(tunnel.name) is not cached[1]:
                status = _tunnel_status(tunnel, peering, observed, error, daemon_error, now, not_applicable(tunnel))
                if kept is not None:
                    status = replace(status, state=TunnelState.INVALID, reason=kept[0], last_good_since=kept[1])
                cached = memo[tunnel.name] = (key, _stamp(status, before.get(tunnel.name), now))
            stamped.append(cached[1])
            seen.add(tunnel.name)
    for name in memo.keys() - seen:
        del memo[name]
    stamped.sort(key=lambda status: status.name)
    return StatusSnapshot(tuple(stamped), global_config, daemon_error, now, certificates, reconcile)


def _stamp(status: TunnelStatus, old: TunnelStatus | None, now: float) -> TunnelStatus:
    since = old.since if old is not None and old.state == status.state else now
    return _with_history(replace(status, since=since), old)


def _with_history(status: TunnelStatus, old: TunnelStatus | None) -> TunnelStatus:
    """Carry counters and the established time over from the tunnel's previous status."""
    if old is None:
        return replace(status, failures=int(status.state is TunnelState.ERROR))
    up_before, up_now = old.ike_sas > 0, status.ike_sas > 0  # an IKE SA up, encrypting yet or not
    rekeys = old.rekeys + (len(set(status.ike_sa_ids) - set(old.ike_sa_ids)) if up_before and up_now else 0)
    failed = ((status.state is TunnelState.ERROR and old.state is not TunnelState.ERROR)
              or (up_before and status.state in (TunnelState.LOADED, TunnelState.PENDING)))
    established_at = status.established_at
    if up_now and old.ike_sa_ids[:1] == status.ike_sa_ids[:1] and old.established_at is not None:
        # The same SA as before: its age from charon was exact when first seen, while the cached
        # observation of an SA not looked at in this pass is stale.
        established_at = old.established_at
    return replace(status, rekeys=rekeys, failures=old.failures + failed, established_at=established_at)


def certificate_statuses(global_config: GlobalConfig, facts: CertificateFacts) -> tuple[CertificateStatus, ...]:
    """Every certificate file the validator looked at, with its role, for expiry metrics and events."""
    def role(path: str) -> str:
        return "local" if path == global_config.certificate else "ca" if path == global_config.ca_cert else "peer"

    return tuple(CertificateStatus(path, role(path), cert.cn, cert.not_after, cert.error)
                 for path, cert in sorted(facts.certs.items()))


def _invalid_status(invalid: Invalid) -> TunnelStatus:
    return TunnelStatus(name=invalid.name, type=invalid.type, local_ip=invalid.local_ip,
                        remote_ip=invalid.remote_ip, auth=invalid.auth.value if invalid.auth else None,
                        state=invalid.state, reason=invalid.reason)


def _tunnel_status(tunnel: Tunnel, peering: Peering, observed: ObservedState, error: str | None,
                   daemon_error: str | None, now: float, not_applicable: tuple[tuple[str, str], ...]) -> TunnelStatus:
    sas = observed.sas_of(peering.conn_name)
    up = sorted((sa for sa in sas if sa.established), key=lambda sa: sa.established_seconds or 0)
    mine = set(peering.children_of(tunnel.name))
    installed = mine & {child for sa in up for child in sa.installed_children}
    encrypting = bool(mine) and installed == mine
    if error:
        state, reason = TunnelState.ERROR, error
    elif encrypting:
        state, reason = TunnelState.ESTABLISHED, None
    elif up:
        state, reason = TunnelState.NEGOTIATING, (f"the IKE SA is up; {len(installed)} of {len(mine)} child SAs "
                                                 "installed, so the tunnel's traffic is not encrypted yet")
    elif peering.conn_name in observed.conns:
        state, reason = TunnelState.LOADED, None
    elif daemon_error:
        state, reason = TunnelState.ERROR, daemon_error
    else:
        state, reason = TunnelState.PENDING, None
    sa_lines = tuple(
        f"{sa.conn_name}[{sa.unique_id}]: {sa.state}"
        + (f" {sa.established_seconds}s" if sa.established_seconds is not None else "")
        + (f", child SAs installed: {', '.join(sorted(mine & set(sa.installed_children)))}"
           if mine & set(sa.installed_children) else "")
        for sa in sas)
    return TunnelStatus(
        name=tunnel.name, type=tunnel.type.value, local_ip=tunnel.local_ip, remote_ip=tunnel.remote_ip,
        auth=tunnel.auth.value, state=state, reason=reason, ike_sas=len(up),
        child_sas=sum(len(mine & set(sa.installed_children)) for sa in up), conn=peering.conn_name,
        initiator=peering.initiator, remote_name=tunnel.remote_name, local_name=tunnel.local_name,
        remote_cert=tunnel.remote_cert_pem is not None, dst_port=tunnel.dst_port,
        options=tunnel.options.in_force(), ignored_options=tunnel.options.ignored + not_applicable,
        encrypting=encrypting, installed_children=tuple(sorted(installed)), ofport=tunnel.ofport,
        cfm_fault=tunnel.cfm_fault, sa_lines=sa_lines,
        ike_sa_ids=tuple(sa.unique_id for sa in up),
        established_at=now - (up[0].established_seconds or 0) if up else None)
