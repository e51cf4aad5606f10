"""Tunnel -> the VICI messages that describe it to charon. Pure: no socket, no file.

Naming is the ownership marker: every connection is `ovsipsec-<interface>-<digest>` and every
shared secret `ovsipsec-<interface>`. The digest covers every parameter of the rendered
connection, so a restart with unchanged configuration renders the very same names (nothing is
reloaded, no SA is dropped), while any parameter change yields a new name: the old connection
is removed and the new one loaded, which re-authenticates exactly that tunnel.
"""

from __future__ import annotations

import hashlib
import json

from ...model import AuthMethod, Selector, Tunnel

OWNER_PREFIX = "ovsipsec-"

# Upstream ovs-monitor-ipsec's strongSwan proposals, kept so that mixed clusters interoperate.
DEFAULT_IKE_PROPOSAL = "aes256gcm16-sha256-modp2048"
DEFAULT_ESP_PROPOSAL = "aes256gcm16-modp2048"
DEFAULT_DPD_DELAY = "30s"


def render_conn(tunnel: Tunnel) -> tuple[str, dict]:
    """The connection's name and the body of its load-conn message."""
    body = _conn_body(tunnel)
    canonical = json.dumps(body, sort_keys=True, default=_pem_digest).encode()
    return f"{OWNER_PREFIX}{tunnel.name}-{hashlib.sha256(canonical).hexdigest()[:10]}", body


def secret_id(tunnel_name: str) -> str:
    return f"{OWNER_PREFIX}{tunnel_name}"


def tunnel_of_conn(name: str) -> str | None:
    """The interface a connection of ours belongs to, or None when the name is not ours."""
    if not name.startswith(OWNER_PREFIX) or "-" not in name[len(OWNER_PREFIX):]:
        return None
    return name[len(OWNER_PREFIX):].rsplit("-", 1)[0]


def tunnel_of_secret(secret: str) -> str | None:
    return secret[len(OWNER_PREFIX):] if secret.startswith(OWNER_PREFIX) else None


def _conn_body(tunnel: Tunnel) -> dict:
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
        "children": _children(tunnel, options),
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


def child_names(tunnel: Tunnel) -> tuple[str, ...]:
    return tuple(_child_name(selector) for selector in tunnel.selectors)


def _children(tunnel: Tunnel, options: dict[str, str]) -> dict:
    children = {}
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
        replay = options.get("replay-window", options.get("replay_window"))
        if replay:
            child["replay_window"] = replay
        children[_child_name(selector)] = child
    return children


def _child_name(selector: Selector) -> str:
    if selector.protocol == "gre":
        return "gre"
    return "out" if selector.remote_port else "in"


def _traffic_selector(protocol: str, port: int | None) -> str:
    return f"dynamic[{protocol}/{port}]" if port else f"dynamic[{protocol}]"


def _pem_digest(value: object) -> str:
    if isinstance(value, bytes):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot render {type(value).__name__}")
