"""LibreSwan rendering: the exact files pluto reads, and names that are stable and ours."""

from __future__ import annotations

import base64

import dataclasses

import pytest

from testsupport.builders import desired, row
from testsupport.golden import GOLDEN_DIR, assert_golden
from ovs_ipsec.backends.libreswan import render
from ovs_ipsec.model import AuthMethod, Tunnel, TunnelType
from ovs_ipsec.planner import group_peerings
from ovs_ipsec.validate import CertificateFacts, validate

PSK = dict(local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish")
V4 = render.Style(major=4)
V5 = render.Style(major=5)


def peering_of(*rows, style=V4):
    tunnels = validate(desired(*rows), CertificateFacts(), 0).tunnels
    (peering,) = group_peerings(tunnels, render.naming(style))[0].values()
    return peering


def pem(name: str) -> bytes:
    return (GOLDEN_DIR / f"libreswan_{name}.pem").read_bytes()


def cert_tunnel(auth: AuthMethod, **changes) -> Tunnel:
    base = dict(name="tun", type=TunnelType.GENEVE, remote_ip="10.0.0.2", local_ip="10.0.0.1", family=4,
                dst_port=6081, local_name="hostA", remote_name="hostB", local_cert_pem=pem("hostA-cert"),
                auth=auth)
    if auth is AuthMethod.PEER_CERT:
        base["remote_cert_pem"] = pem("hostB-rsa-cert")
    else:
        base["ca_cert_pem"] = pem("cacert")
    return dataclasses.replace(Tunnel(**base), **changes)


def cert_peering(tunnel: Tunnel, style=V4):
    (peering,) = group_peerings([tunnel], render.naming(style))[0].values()
    return peering


@pytest.mark.parametrize("case, r, style", [
    # LibreSwan's own proposal names and --use-default-crypto; the cases every backend shares are in
    # tests/unit/backends/test_render_cases.py.
    ("gre_ipv6_options", row("gre0", "gre", local_ip="fd00::1", remote_ip="fd00::2", psk="x",
                             ipsec_ike="aes_gcm128-sha2_256", ipsec_esp="aes_gcm128", ipsec_dpd_delay="10s",
                             ipsec_dpd_timeout="60s", ipsec_ikelifetime="8h", ipsec_salifetime="1h",
                             **{"ipsec_replay-window": "128"}), V4),
    ("default_crypto", row("gnv0", "geneve", **PSK), render.Style(major=4, default_crypto=True)),
])
def test_psk_files_match_golden(case, r, style):
    peering = peering_of(r, style=style)
    assert_golden(f"libreswan_{case}.conf", render.conn_file(peering, style))


def test_a_shared_peering_is_one_file_with_every_child_and_the_anchor_last():
    peering = peering_of(row("gnv0", "geneve", **PSK), row("gre0", "gre", **PSK))
    conns = [line.split()[1] for line in render.conn_file(peering, V4).splitlines() if line.startswith("conn ")]
    assert conns == list(render.pluto_names(peering))
    assert conns[-1] == render.anchor_name(peering.conn_name)


def test_secrets_file_holds_the_psk_base64_encoded():
    peering = peering_of(row("gnv0", "geneve", **PSK))
    assert render.secrets_file(peering) == f"{render.FILE_HEADER}10.0.0.1 10.0.0.2 : PSK 0sc3dvcmRmaXNo\n"
    without_local = peering_of(row("gnv0", "geneve", remote_ip="10.0.0.2", psk="swordfish"))
    assert render.secrets_file(without_local).endswith("%any 10.0.0.2 : PSK 0sc3dvcmRmaXNo\n")


@pytest.mark.parametrize("psk", ['a"b', "back\\slash", "has # hash", "sp ace", "ünïcödé", "x\ny", "\u2028"])
def test_any_psk_is_one_base64_token_on_one_line(psk):
    text = render.secrets_file(peering_of(row("gnv0", "geneve", **dict(PSK, psk=psk))))
    line = text.splitlines()[-1]
    assert text.count("\n") == 2 and line.startswith("10.0.0.1 10.0.0.2 : PSK 0s")
    assert base64.b64decode(line.split("0s", 1)[1]).decode() == psk


@pytest.mark.parametrize("auth", [AuthMethod.CA_CERT, AuthMethod.PEER_CERT])
def test_certificate_files_name_the_key_kinds_and_nss_entries(auth):
    peering = cert_peering(cert_tunnel(auth))
    text = render.conn_file(peering, V4)
    assert "leftauth=ecdsa" in text  # our ECDSA P-256 key
    if auth is AuthMethod.PEER_CERT:
        assert "rightauth=rsasig" in text and "rightcert=ovsipsec-peer-" in text  # the pinned RSA peer
    else:
        assert "rightca=%same" in text and "rightauth=ecdsa" in text
    assert all(f"cert={n}" in text for n in render.nss_names(peering.tunnels[0])[:2] if n)


def test_names_are_ours_stable_and_split_back():
    peering = peering_of(row("a:b@c+d.e_f", "gre", **PSK), row("gnv0", "geneve", **PSK))
    assert peering.conn_name.startswith(render.OWNER_PREFIX)
    assert peering == peering_of(row("a:b@c+d.e_f", "gre", **PSK), row("gnv0", "geneve", **PSK))
    for name in render.pluto_names(peering):
        conn, child = render.split_name(name)
        assert conn == peering.conn_name and name == f"{conn}_{child}"
    assert render.split_name("myvpn-2") is None
    assert render.split_name("ovsipsec-fd00::2-0123456789_x-gre-abcdef") == ("ovsipsec-fd00::2-0123456789",
                                                                            "x-gre-abcdef")


def test_ike_changes_rename_the_peering_and_child_changes_only_the_child():
    base = peering_of(row("gnv0", "geneve", **PSK))
    ike = peering_of(row("gnv0", "geneve", ipsec_ike="aes_gcm128-sha2_256", **PSK))
    esp = peering_of(row("gnv0", "geneve", ipsec_esp="aes_gcm128", **PSK))
    assert ike.conn_name != base.conn_name
    assert esp.conn_name == base.conn_name and esp.children != base.children
    assert peering_of(row("gnv0", "geneve", **PSK), style=V5).conn_name != base.conn_name


def test_a_rotated_certificate_renames_the_peering_but_keeps_its_nicknames():
    tunnel = cert_tunnel(AuthMethod.CA_CERT)
    rotated = dataclasses.replace(tunnel, local_cert_pem=tunnel.local_cert_pem.replace(b"\n", b"\r\n"))
    assert render.conn_name(tunnel, V4) != render.conn_name(rotated, V4)  # same subject, new content
    assert render.nss_names(tunnel) == render.nss_names(rotated)  # NSS keeps one nickname per subject
    local, peer, ca = render.nss_names(tunnel)
    assert local.startswith("ovsipsec-key-") and peer is None and ca.startswith("ovsipsec-ca-")


def test_values_that_could_inject_configuration_are_refused():
    tunnel = cert_tunnel(AuthMethod.CA_CERT, local_name='hostA"\n    leftupdown=/tmp/x')
    with pytest.raises(ValueError):
        render.conn_file(cert_peering(tunnel), V4)
    with pytest.raises(ValueError):  # validation allows no space in a name; the renderer checks again
        render.conn_file(cert_peering(cert_tunnel(AuthMethod.CA_CERT, local_name="host A")), V4)
