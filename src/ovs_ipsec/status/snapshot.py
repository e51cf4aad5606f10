"""Per-tunnel status, computed once per reconcile pass and read by every status query.

Pure: validated tunnels, observed SAs and recorded errors in, a frozen snapshot out. Queries
(unixctl, `ovs-ipsec status`, metrics) read the last snapshot and never run a command.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..model import GlobalConfig, Invalid, ObservedState, Tunnel, TunnelState, ValidatedState
from ..planner import Peering


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
    ike_options: tuple[tuple[str, str], ...] = ()
    ofport: int | None = None
    cfm_fault: bool | None = None
    sa_lines: tuple[str, ...] = ()

    def as_json(self) -> dict:
        return {
            "name": self.name, "type": self.type, "local_ip": self.local_ip, "remote_ip": self.remote_ip,
            "auth": self.auth, "state": self.state.value, "reason": self.reason,
            "ike_sas": self.ike_sas, "child_sas": self.child_sas, "since": self.since,
            "conn": self.conn, "initiator": self.initiator, "remote_name": self.remote_name,
            "dst_port": self.dst_port, "ofport": self.ofport,
        }


@dataclass(frozen=True)
class StatusSnapshot:
    tunnels: tuple[TunnelStatus, ...]
    global_config: GlobalConfig
    ike_daemon_error: str | None
    taken_at: float | None

    @classmethod
    def empty(cls) -> StatusSnapshot:
        return cls((), GlobalConfig(), None, None)

    def as_json(self) -> dict:
        return {
            "tunnels": [tunnel.as_json() for tunnel in self.tunnels],
            "ike_daemon": {"reachable": self.ike_daemon_error is None, "error": self.ike_daemon_error},
            "skb_mark": self.global_config.skb_mark,
            "taken_at": self.taken_at,
        }


def build_snapshot(validated: ValidatedState, peerings: Mapping[str, Peering], observed: ObservedState,
                   errors: Mapping[str, str], daemon_error: str | None, global_config: GlobalConfig,
                   previous: StatusSnapshot, now: float) -> StatusSnapshot:
    before = {tunnel.name: tunnel for tunnel in previous.tunnels}
    statuses = [_invalid_status(invalid) for invalid in validated.invalid]
    for peering in peerings.values():
        for tunnel in peering.tunnels:
            statuses.append(_tunnel_status(tunnel, peering, observed, errors.get(peering.conn_name), daemon_error))
    stamped = []
    for status in sorted(statuses, key=lambda s: s.name):
        old = before.get(status.name)
        since = old.since if old is not None and old.state == status.state else now
        stamped.append(replace(status, since=since))
    return StatusSnapshot(tuple(stamped), global_config, daemon_error, now)


def _invalid_status(invalid: Invalid) -> TunnelStatus:
    return TunnelStatus(name=invalid.name, type=invalid.type, local_ip=invalid.local_ip,
                        remote_ip=invalid.remote_ip, auth=invalid.auth.value if invalid.auth else None,
                        state=TunnelState.INVALID, reason=invalid.reason)


def _tunnel_status(tunnel: Tunnel, peering: Peering, observed: ObservedState, error: str | None,
                   daemon_error: str | None) -> TunnelStatus:
    sas = observed.sas_of(peering.conn_name)
    up = [sa for sa in sas if sa.established]
    mine = set(peering.children_of(tunnel.name))
    if error:
        state, reason = TunnelState.ERROR, error
    elif up:
        state, reason = TunnelState.ESTABLISHED, None
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
        ike_options=tunnel.ike_options, ofport=tunnel.ofport, cfm_fault=tunnel.cfm_fault, sa_lines=sa_lines)
