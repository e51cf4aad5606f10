"""Validation rules: each bad input names the tunnel's problem and leaves the others alone."""

from __future__ import annotations

import pytest

from builders import desired, row
from ovs_ipsec.model import AuthMethod, TunnelType
from ovs_ipsec.validate import CertificateFacts, validate

NOW = 1_800_000_000.0
PSK = dict(local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish")


def check(*rows, **global_config):
    return validate(desired(*rows, **global_config), CertificateFacts(), NOW)


def reason_of(result, name):
    return {i.name: i.reason for i in result.invalid}[name]


@pytest.mark.parametrize("tunnel_type, port", [("geneve", 6081), ("vxlan", 4789), ("stt", 7471), ("gre", None)])
def test_psk_tunnel_of_each_type_is_valid(tunnel_type, port):
    result = check(row("t", tunnel_type, **PSK))
    (tunnel,) = result.tunnels
    assert tunnel.type is TunnelType(tunnel_type)
    assert tunnel.auth is AuthMethod.PSK
    assert tunnel.dst_port == port
    assert tunnel.family == 4
    assert not result.invalid


def test_interfaces_without_auth_options_are_not_ipsec_tunnels():
    result = check(row("plain", "geneve", remote_ip="10.0.0.2"), row("internal", "internal"))
    assert result.tunnels == () and result.invalid == ()


def test_custom_dst_port_gives_selectors_on_that_port():
    (tunnel,) = check(row("t", "vxlan", dst_port="7000", **PSK)).tunnels
    assert [(s.protocol, s.local_port, s.remote_port) for s in tunnel.selectors] == [
        ("udp", None, 7000), ("udp", 7000, None)]


def test_local_ip_is_optional_as_in_the_seed_documents():
    (tunnel,) = check(row("t", "gre", remote_ip="2.2.2.2", psk="swordfish")).tunnels
    assert tunnel.local_ip is None


@pytest.mark.parametrize("options, expected", [
    (dict(local_ip="10.0.0.1", psk="x"), "'remote_ip' is not set"),
    (dict(remote_ip="flow", psk="x"), "'remote_ip=flow' cannot be encrypted"),
    (dict(remote_ip="host.example", psk="x"), "'remote_ip' 'host.example' is not an IP address"),
    (dict(local_ip="10.0.0.1", remote_ip="fd00::2", psk="x"), "not of the same address family"),
    (dict(local_ip="flow", remote_ip="10.0.0.2", psk="x"), "'local_ip=flow'"),
    (dict(PSK, psk='sw"ord'), "'psk' contains a double quote or a control character"),
    (dict(PSK, psk="sw\nleftid=evil"), "'psk' contains a double quote or a control character"),
    (dict(PSK, psk=""), "'psk' is empty"),
    (dict(PSK, remote_name="peer"), "'remote_cert' and 'remote_name' must be unset with PSK"),
    (dict(PSK, ipsec_leftupdown="/bin/evil"), "option 'ipsec_leftupdown' is not supported"),
    (dict(PSK, ipsec_ike="aes256\n  also=evil"), "option 'ipsec_ike' has an invalid value"),
    (dict(PSK, dst_port="70000"), "'dst_port' '70000' is not a port number"),
    (dict(local_ip="10.0.0.1", remote_ip="10.0.0.2", remote_name="peer"),
     "must set 'certificate' as local certificate"),
])
def test_bad_input_is_invalid_with_a_reason_and_does_not_disturb_a_valid_tunnel(options, expected):
    result = check(row("bad", "geneve", **options), row("good", "gre", **PSK))
    assert [t.name for t in result.tunnels] == ["good"]
    assert expected in reason_of(result, "bad")


def test_unsupported_type_is_named():
    result = check(row("e", "erspan", **PSK))
    assert "type 'erspan' cannot be encrypted" in reason_of(result, "e")


def test_ip6gre_needs_ipv6():
    assert "needs an IPv6 'remote_ip'" in reason_of(check(row("t", "ip6gre", **PSK)), "t")
    (tunnel,) = check(row("t", "ip6gre", local_ip="fd00::1", remote_ip="fd00::2", psk="x")).tunnels
    assert tunnel.family == 6


def test_two_tunnels_needing_the_same_policy_keep_the_first():
    result = check(row("a", "geneve", **PSK), row("b", "geneve", **PSK))
    assert [t.name for t in result.tunnels] == ["a"]
    assert "tunnel 'a' already encrypts the same traffic" in reason_of(result, "b")


def test_allowlisted_ipsec_options_are_kept_and_forceencaps_is_derived():
    (tunnel,) = check(row("t", "geneve", ipsec_encapsulation="yes", ipsec_ike="aes128-sha256-modp2048",
                          **PSK)).tunnels
    assert tunnel.forceencaps
    assert dict(tunnel.ike_options) == {"encapsulation": "yes", "ike": "aes128-sha256-modp2048"}


def test_psk_and_certificate_tunnels_may_coexist():
    result = check(row("p", "gre", **PSK), certificate="/nonexistent/cert.pem", private_key="/nonexistent/key.pem")
    assert [t.name for t in result.tunnels] == ["p"]


def test_psk_is_not_in_the_tunnel_repr():
    (tunnel,) = check(row("t", "gre", **PSK)).tunnels
    assert "swordfish" not in repr(tunnel)


def test_memo_reuses_unchanged_rows():
    memo = {}
    state = desired(row("a", "gre", **PSK))
    first = validate(state, CertificateFacts(), NOW, memo=memo)
    second = validate(state, CertificateFacts(), NOW, memo=memo)
    assert first.tunnels[0] is second.tunnels[0]
