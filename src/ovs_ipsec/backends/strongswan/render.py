"""Tunnels -> the VICI messages that describe them to charon. Pure: no socket, no file.

Naming is the ownership marker. A connection is `ovsipsec-<remote ip>-<digest>`, the digest
covering every IKE-level parameter, so tunnels that can share an IKE SA get the same connection
and any IKE-level change gives a new one. A child is `<interface>-<in|out|gre>-<digest>`, the
digest covering that tunnel's child parameters. A restart with unchanged configuration renders
the very same names, so nothing is reloaded and no SA is dropped.
"""

from __future__ import annotations

import re

from ...model import AuthMethod, IkeOptions, Tunnel
from ...planner import Peering
from ..naming import OWNER_PREFIX, digest, direction

CHILD_NAME = re.compile(r"(?P<tunnel>[A-Za-z0-9_.:@+-]{1,200})-(?:in|out|gre)-[0-9a-f]{6}")
# curve25519 first: two hosts of ours agree on it (a fraction of MODP-2048's Diffie-Hellman cost,
# at least its strength). MODP-2048, upstream ovs-monitor-ipsec's only group, stays in the same
# proposal so mixed clusters still agree on it, whichever side initiates (ours initiating gets one
# INVALID_KE_PAYLOAD and retries with it). Changing these renames every connection (the name's
# digest covers them): the first pass after an upgrade replaces each connection once. Operators
# who pin upstream's pair with options:ipsec_ike/ipsec_esp keep the old names.
DEFAULT_IKE_PROPOSAL = "aes256gcm16-sha256-curve25519-modp2048"
DEFAULT_ESP_PROPOSAL = "aes256gcm16-curve25519-modp2048"
DEFAULT_ESP_PROPOSAL_NO_PFS = "aes256gcm16"
DEFAULT_DPD_DELAY = 30
# ipsec.conf's defaults, which the rekeying options were written against.
IKE_LIFETIME, SA_LIFETIME, DEFAULT_MARGIN, DEFAULT_FUZZ = 3 * 3600, 3600, 9 * 60, 100


def conn_name(tunnel: Tunnel) -> str:
    return f"{OWNER_PREFIX}{tunnel.remote_ip}-{digest(_ike_body(tunnel), 10)}"


def secret_id(tunnel: Tunnel) -> str | None:
    return conn_name(tunnel) if tunnel.auth is AuthMethod.PSK else None


def child_names(tunnel: Tunnel) -> tuple[str, ...]:
    parameters = digest(_child_bodies(tunnel), 6)
    return tuple(f"{tunnel.name}-{direction(selector)}-{parameters}" for selector in tunnel.selectors)


def child_owner(child: str) -> str | None:
    match = CHILD_NAME.fullmatch(child)
    return match["tunnel"] if match else None


def render_conn(peering: Peering) -> dict:
    """The load-conn message for a peering: its IKE parameters and every member tunnel's children."""
    body = _ike_body(peering.tunnels[0])
    children: dict[str, dict] = {}
    for tunnel in peering.tunnels:
        children.update(zip(child_names(tunnel), _child_bodies(tunnel), strict=True))
    body["children"] = children
    return {peering.conn_name: body}


def _ike_body(tunnel: Tunnel) -> dict:
    options = tunnel.options
    body = {
        "version": "2",
        "local_addrs": [tunnel.local_ip or "%any"],
        "remote_addrs": [tunnel.remote_ip],
        "proposals": _proposals(options.ike, DEFAULT_IKE_PROPOSAL),
        "encap": _yes_no(options.forceencaps),
        "dpd_delay": f"{DEFAULT_DPD_DELAY if options.dpd_delay is None else options.dpd_delay}s",
        "local": _local_auth(tunnel),
        "remote": _remote_auth(tunnel),
    }
    body.update(_rekeying(options.ike_lifetime, IKE_LIFETIME, options, with_life_time=False))
    for key, value in (("mobike", options.mobike), ("fragmentation", options.fragmentation),
                       ("keyingtries", options.keyingtries)):
        if value is not None:
            body[key] = _yes_no(value) if isinstance(value, bool) else str(value)
    return body


def not_applicable(options: IkeOptions) -> tuple[tuple[str, str], ...]:
    """Options charon has no per-connection setting for, with the reason status shows."""
    global_only = "charon has this setting in strongswan.conf only, for all connections"
    return tuple((name, why) for name, value, why in (
        ("dpd_timeout", options.dpd_timeout, "charon ends an unanswered IKEv2 liveness check after its "
                                             "retransmission timeout (strongswan.conf), not per connection"),
        ("retransmit_timeout", options.retransmit_timeout, global_only),
        ("nat_keepalive", options.nat_keepalive, global_only),
    ) if value is not None)


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
    options = tunnel.options
    default_esp = DEFAULT_ESP_PROPOSAL if options.pfs is not False else DEFAULT_ESP_PROPOSAL_NO_PFS
    bodies = []
    for selector in tunnel.selectors:
        child = {
            "mode": "transport",
            "local_ts": [_traffic_selector(selector.protocol, selector.local_port)],
            "remote_ts": [_traffic_selector(selector.protocol, selector.remote_port)],
            "esp_proposals": [_with_esn(p, options.esn) for p in _proposals(options.esp, default_esp)],
            # Trap on both sides: until an SA exists the kernel holds tunnel packets instead of
            # sending them in plaintext, and a packet triggers negotiation if ours has not.
            "start_action": "trap",
            "dpd_action": "trap",
        }
        child.update(_rekeying(options.sa_lifetime, SA_LIFETIME, options, with_life_time=True))
        if options.replay_window is not None:
            child["replay_window"] = str(options.replay_window)
        bodies.append(child)
    return bodies


def _rekeying(lifetime: int | None, default_lifetime: int, options: IkeOptions, with_life_time: bool) -> dict:
    """ipsec.conf's lifetime, margin and fuzz as charon's rekey, over and rand times.

    ipsec.conf (what upstream wrote these options into) rekeys `margin` before the end of the
    lifetime, spread by up to `margin * fuzz%`; charon's own fields count from the start. Only
    what the operator set is rendered: otherwise charon's defaults apply, as they always did.
    """
    if lifetime is None and options.rekey_margin is None and options.rekey_fuzz is None:
        return {}
    lifetime = default_lifetime if lifetime is None else lifetime
    margin = DEFAULT_MARGIN if options.rekey_margin is None else options.rekey_margin
    fuzz = DEFAULT_FUZZ if options.rekey_fuzz is None else options.rekey_fuzz
    margin = min(margin, lifetime - 1)  # validation refuses margin >= lifetime; never a negative time
    times = {"rekey_time": f"{lifetime - margin}s", "rand_time": f"{min(margin * fuzz // 100, margin)}s"}
    if with_life_time:
        times["life_time"] = f"{lifetime}s"
    else:
        times["over_time"] = f"{margin}s"
    return times


def _with_esn(proposal: str, esn: str | None) -> str:
    """LibreSwan's esn= as charon says it: extended sequence numbers are part of the ESP proposal."""
    if esn is None or "esn" in proposal.split("-"):
        return proposal
    return proposal + {"yes": "-esn", "no": "-noesn", "either": "-esn-noesn"}[esn]


def _proposals(chosen: tuple[str, ...] | None, default: str) -> list[str]:
    # ipsec.conf's strict flag "!" has no VICI equivalent: a VICI list is always strict.
    return [proposal.rstrip("!") for proposal in chosen] if chosen else [default]


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _traffic_selector(protocol: str, port: int | None) -> str:
    return f"dynamic[{protocol}/{port}]" if port else f"dynamic[{protocol}]"

