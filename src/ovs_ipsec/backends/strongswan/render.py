"""Tunnels -> the VICI messages that describe them to charon. Pure: no socket, no file.

Naming is the ownership marker. A connection is `ovsipsec-<remote ip>-<digest>`, the digest
covering every IKE-level parameter, so tunnels that can share an IKE SA get the same connection
and any IKE-level change gives a new one. A child is `<interface>-<in|out|gre>-<digest>`, the
digest covering that tunnel's child parameters. A restart with unchanged configuration renders
the very same names, so nothing is reloaded and no SA is dropped.
"""

from __future__ import annotations

from ...model import AuthMethod, Tunnel
from ...planner import Peering
from ..naming import OWNER_PREFIX, digest, direction

# Upstream ovs-monitor-ipsec's strongSwan proposals, kept so that mixed clusters interoperate.
DEFAULT_IKE_PROPOSAL = "aes256gcm16-sha256-modp2048"
DEFAULT_ESP_PROPOSAL = "aes256gcm16-modp2048"
DEFAULT_DPD_DELAY = "30s"


def conn_name(tunnel: Tunnel) -> str:
    return f"{OWNER_PREFIX}{tunnel.remote_ip}-{digest(_ike_body(tunnel), 10)}"


def secret_id(tunnel: Tunnel) -> str | None:
    return conn_name(tunnel) if tunnel.auth is AuthMethod.PSK else None


def child_names(tunnel: Tunnel) -> tuple[str, ...]:
    parameters = digest(_child_bodies(tunnel), 6)
    return tuple(f"{tunnel.name}-{direction(selector)}-{parameters}" for selector in tunnel.selectors)


def render_conn(peering: Peering) -> dict:
    """The load-conn message for a peering: its IKE parameters and every member tunnel's children."""
    body = _ike_body(peering.tunnels[0])
    children = {}
    for tunnel in peering.tunnels:
        children.update(zip(child_names(tunnel), _child_bodies(tunnel)))
    body["children"] = children
    return {peering.conn_name: body}


def _ike_body(tunnel: Tunnel) -> dict:
    options = dict(tunnel.ike_options)
    body = {
        "version": "2",
        "local_addrs": [tunnel.local_ip or "%any"],
        "remote_addrs": [tunnel.remote_ip],
        "proposals": [options.get("ike", DEFAULT_IKE_PROPOSAL)],
        "encap": "yes" if tunnel.forceencaps else "no",
        "dpd_delay": options.get("dpd-delay", options.get("dpddelay", DEFAULT_DPD_DELAY)),
        "local": _local_auth(tunnel),
        "remote": _remote_auth(tunnel),
    }
    if "dpd-timeout" in options or "dpdtimeout" in options:
        body["dpd_timeout"] = options.get("dpd-timeout", options.get("dpdtimeout"))
    if "ikelifetime" in options:
        body["rekey_time"] = options["ikelifetime"]
    return body


def _local_auth(tunnel: Tunnel) -> dict:
    if tunnel.auth is AuthMethod.PSK:
        return {"auth": "psk", **({"id": tunnel.local_ip} if tunnel.local_ip else {})}
    return {"auth": "pubkey", "id": tunnel.local_name, "certs": [tunnel.local_cert_pem]}


def _remote_auth(tunnel: Tunnel) -> dict:
    if tunnel.auth is AuthMethod.PSK:
        return {"auth": "psk", "id": tunnel.remote_ip}
    if tunnel.auth is AuthMethod.PEER_CERT:
        # The peer's own certificate is the trust anchor: only that exact certificate is accepted.
        return {"auth": "pubkey", "id": tunnel.remote_name, "certs": [tunnel.remote_cert_pem]}
    return {"auth": "pubkey", "id": tunnel.remote_name, "cacerts": [tunnel.ca_cert_pem]}


def _child_bodies(tunnel: Tunnel) -> list[dict]:
    options = dict(tunnel.ike_options)
    bodies = []
    for selector in tunnel.selectors:
        child = {
            "mode": "transport",
            "local_ts": [_traffic_selector(selector.protocol, selector.local_port)],
            "remote_ts": [_traffic_selector(selector.protocol, selector.remote_port)],
            "esp_proposals": [options.get("esp", DEFAULT_ESP_PROPOSAL)],
            # Trap on both sides: until an SA exists the kernel holds tunnel packets instead of
            # sending them in plaintext, and a packet triggers negotiation if ours has not.
            "start_action": "trap",
            "dpd_action": "trap",
        }
        for key in ("salifetime", "lifetime"):
            if key in options:
                child["rekey_time"] = options[key]
        if "replay-window" in options:
            child["replay_window"] = options["replay-window"]
        bodies.append(child)
    return bodies



def _traffic_selector(protocol: str, port: int | None) -> str:
    return f"dynamic[{protocol}/{port}]" if port else f"dynamic[{protocol}]"

