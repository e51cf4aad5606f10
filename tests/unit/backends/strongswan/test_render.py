"""strongSwan rendering: the exact VICI messages, and names that are stable and ours."""

from __future__ import annotations

import json

import pytest

from testsupport.builders import desired, row
from testsupport.golden import assert_golden
from ovs_ipsec.backends.naming import is_ours
from ovs_ipsec.backends.strongswan import render
from ovs_ipsec.model import AuthMethod, Tunnel, TunnelType
from ovs_ipsec.planner import group_peerings
from ovs_ipsec.validate import CertificateFacts, validate
from ovs_ipsec.backends.strongswan.backend import StrongSwanBackend

PSK = dict(local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish")


def tunnel_of(r):
    (tunnel,) = validate(desired(r), CertificateFacts(), 0).tunnels
    return tunnel


def as_text(message):
    return json.dumps(message, indent=2, sort_keys=True, default=lambda b: b.decode()) + "\n"


def message_for(*rows):
    tunnels = validate(desired(*rows), CertificateFacts(), 0).tunnels
    (peering,) = group_peerings(tunnels, StrongSwanBackend.naming)[0].values()
    return render.render_conn(peering)


@pytest.mark.parametrize("case, r", [
    # charon's own proposal names; the cases every backend shares are in tests/unit/backends/test_render_cases.py.
    ("gre_ipv6_options", row("gre0", "gre", local_ip="fd00::1", remote_ip="fd00::2", psk="x",
                             ipsec_ike="aes128gcm16-sha256-ecp256", ipsec_esp="aes128gcm16", ipsec_dpd_delay="10s",
                             **{"ipsec_replay-window": "128"})),
])
def test_psk_connections_match_golden(case, r):
    assert_golden(f"strongswan_{case}.json", as_text(message_for(r)))


def test_certificate_connections_embed_their_certificates():
    base = dict(name="t", type=TunnelType.GENEVE, remote_ip="10.0.0.2", local_ip="10.0.0.1", family=4,
                dst_port=6081, local_name="hostA", remote_name="hostB", local_cert_pem=b"LOCAL")
    peer = render._ike_body(Tunnel(auth=AuthMethod.PEER_CERT, remote_cert_pem=b"PEER", **base))
    ca = render._ike_body(Tunnel(auth=AuthMethod.CA_CERT, ca_cert_pem=b"CA", **base))
    assert peer["local"] == {"auth": "pubkey", "id": "hostA", "certs": [b"LOCAL"]}
    assert peer["remote"] == {"auth": "pubkey", "id": "hostB", "certs": [b"PEER"]}
    assert ca["remote"] == {"auth": "pubkey", "id": "hostB", "cacerts": [b"CA"]}


def test_names_are_stable_and_change_with_their_parameters():
    tunnel = tunnel_of(row("gnv0", "geneve", **PSK))
    assert render.conn_name(tunnel) == render.conn_name(tunnel_of(row("gnv0", "geneve", **PSK)))
    assert render.conn_name(tunnel).startswith("ovsipsec-10.0.0.2-")
    other_port = tunnel_of(row("gnv0", "geneve", dst_port="7000", **PSK))
    assert render.conn_name(other_port) == render.conn_name(tunnel)  # same IKE SA...
    assert render.child_names(other_port) != render.child_names(tunnel)  # ...other children
    other_ike = tunnel_of(row("gnv0", "geneve", ipsec_ike="aes128-sha256-modp2048", **PSK))
    assert render.conn_name(other_ike) != render.conn_name(tunnel)


def test_the_psk_is_not_part_of_the_connection_or_its_name():
    message = message_for(row("gnv0", "geneve", **PSK))
    other = message_for(row("gnv0", "geneve", **dict(PSK, psk="different")))
    assert message.keys() == other.keys()
    assert "swordfish" not in json.dumps(message, default=str)


def test_ownership_is_recognised_by_prefix():
    assert is_ours("ovsipsec-10.0.0.2-0123456789")
    assert not is_ours("myvpn-2")


def test_default_proposals_offer_curve25519_first_and_keep_modp2048_and_pinning_upstreams_keeps_old_names():
    (conn,) = message_for(row("gnv0", "geneve", **PSK)).values()
    assert conn["proposals"] == ["aes256gcm16-sha256-curve25519-modp2048"]
    assert {p for child in conn["children"].values() for p in child["esp_proposals"]} == \
        {"aes256gcm16-curve25519-modp2048"}
    # A host that pins upstream's proposals renders the names the MODP-2048-only default gave
    # (tests/unit/golden/strongswan_geneve_psk.json before the change): an upgrade then replaces
    # no connection and ends no SA.
    pinned = message_for(row("gnv0", "geneve", ipsec_ike="aes256gcm16-sha256-modp2048",
                             ipsec_esp="aes256gcm16-modp2048", **PSK))
    (name, body), = pinned.items()
    assert name == "ovsipsec-10.0.0.2-c19908a74a"
    assert set(body["children"]) == {"gnv0-in-1e1f82", "gnv0-out-1e1f82"}
