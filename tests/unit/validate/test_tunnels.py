"""Validation rules: each bad input names the tunnel's problem and leaves the others alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ovs_ipsec.inforce import keep_last_good
from ovs_ipsec.model import AuthMethod, TunnelState, TunnelType
from testsupport.builders import desired, row
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
    (dict(PSK, psk=""), "'psk' is empty"),
    (dict(PSK, remote_name="peer"), "'remote_cert' and 'remote_name' must be unset with PSK"),
    (dict(PSK, ipsec_ike="aes256\n  also=evil"), "option 'ipsec_ike' has an invalid value 'aes256\\n  also=evil'"),
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


def test_ipsec_options_become_typed_values():
    (tunnel,) = check(row("t", "geneve", ipsec_encapsulation="yes", ipsec_ike="aes128-sha256-modp2048",
                          ipsec_dpd_delay="1m", **{"ipsec_replay-window": "128"}, **PSK)).tunnels
    options = tunnel.options
    assert options.forceencaps and options.ike == ("aes128-sha256-modp2048",)
    assert options.dpd_delay == 60 and options.replay_window == 128
    assert options.in_force() == (("ike", "aes128-sha256-modp2048"), ("forceencaps", "yes"),
                                  ("dpd_delay", "60s"), ("replay_window", "128"))


def test_an_unknown_ipsec_option_is_ignored_and_reported_never_invalid():
    """OVN copies every NB_Global ipsec_* key onto every tunnel: one of them must not invalidate all."""
    (tunnel,) = check(row("t", "geneve", ipsec_leftupdown="/bin/evil", ipsec_ikev2="insist",
                          ipsec_leftsubnet="0.0.0.0/0", ipsec_type="passthrough",
                          **{"ipsec_x-anything": "20s", "ipsec_x\nevil": "1"}, **PSK)).tunnels
    assert dict(tunnel.options.ignored) == {
        "ipsec_ikev2": "this monitor always uses IKEv2",
        "ipsec_leftsubnet": "refused: endpoints, selectors and identities come from the tunnel's own options",
        "ipsec_leftupdown": "refused: would run a command as root",
        "ipsec_type": "refused: tunnels are always encrypted in transport mode",
        "ipsec_x-anything": "not an option this monitor applies",
        "ipsec_x\\nevil": "not an option this monitor applies",
    }
    assert tunnel.options.in_force() == ()


def test_ovns_own_test_options_are_applied():
    """tests/ovn-ipsec.at of OVN sets these through NB_Global options:ipsec_* (copied onto every tunnel)."""
    (tunnel,) = check(row("ovn-hv2-0", "geneve", ipsec_encapsulation="yes", **{"ipsec_replay-window": "100"},
                          **{"ipsec_dpd-delay": "30s", "ipsec_dpd-timeout": "120s"}, ipsec_salifetime="8h",
                          **PSK)).tunnels
    options = tunnel.options
    assert (options.forceencaps, options.replay_window, options.dpd_delay, options.dpd_timeout,
            options.sa_lifetime, options.ignored) == (True, 100, 30, 120, 8 * 3600, ())


@pytest.mark.parametrize("options, reason", [
    ({"ipsec_esp": "null-sha256"}, "'null' is not an algorithm name"),
    ({"ipsec_ike": "aes128-md5-modp1024"}, "'md5' is not an algorithm name"),
    ({"ipsec_esp": "aes_gmac"}, "'aes_gmac' is not an algorithm name"),
    ({"ipsec_rekeymargin": "2h", "ipsec_salifetime": "1h"}, "must be shorter than 'ipsec_salifetime'"),
    ({"ipsec_salifetime": "10s"}, "a lifetime from 1m to 7d"),
    ({"ipsec_esn": "maybe"}, "(one of: yes, no, either)"),
])
def test_a_malformed_value_of_a_known_option_makes_the_tunnel_invalid(options, reason):
    assert reason in reason_of(check(row("t", "geneve", **options, **PSK)), "t")


def test_two_spellings_of_one_option_must_agree():
    result = check(row("t", "geneve", ipsec_dpddelay="10s", ipsec_dpd_delay="10", **PSK))
    assert result.tunnels[0].options.dpd_delay == 10
    result = check(row("t", "geneve", ipsec_dpddelay="10s", ipsec_dpd_delay="20s", **PSK))
    assert "options 'ipsec_dpd_delay' and 'ipsec_dpddelay' set the same thing differently" in reason_of(result, "t")


@pytest.mark.parametrize("psk", ['sw"ord', "back\\slash", "with # hash", "with space", "ünïcödé", "x" * 2048,
                                 "new\nline", "\u2028"])
def test_any_psk_an_ike_daemon_can_use_is_accepted(psk):
    (tunnel,) = check(row("t", "gre", **dict(PSK, psk=psk))).tunnels
    assert tunnel.psk == psk


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


# The review's findings at 4dd943d (issue 12): each row below passed validation there.
HOSTILE = [
    # 1. a scope id of any characters: a newline forged a secrets line for pluto
    ("remote_ip", 'fe80::1%x\n192.0.2.7 198.51.100.9 : PSK "attacker"\n#'),
    ("remote_ip", "fe80::1%eth0"),
    ("local_ip", "fe80::1%x\u2028conn operator-vpn"),
    # 3. unicode digits pass str.isdigit() and int() then raises
    ("dst_port", "²"),
    ("dst_port", "٣٣"),
    # 4. `$` matches before a final newline
    ("dst_port", "4789\n"),
    ("ipsec_ike", "aes256gcm16\n"),
    ("ipsec_dpd_delay", "30s\n"),
    ("ipsec_encapsulation", "yes\n"),
    ("ipsec_replay_window", "12\n"),
    ("remote_ip", "10.0.0.2\n"),
    ("remote_ip", "0.0.0.0"),
    ("remote_ip", "::"),
    ("remote_ip", "224.0.0.1"),
]


@pytest.mark.parametrize("key, value", HOSTILE)
def test_hostile_values_are_refused_with_the_tunnel_and_the_field_named(key, value):
    options = dict(PSK, **{key: value})
    if key == "local_ip":
        options["remote_ip"] = "fe80::2"
    result = check(row("bad", "vxlan", **options), row("good", "gre", **PSK))
    assert [t.name for t in result.tunnels] == ["good"]
    reason = reason_of(result, "bad")
    assert key in reason and reason.isprintable(), reason


@pytest.mark.parametrize("name", ["vx1\n", "vx 1", "vx1\u2028", "", "x" * 201, "a;b", "%any"])
def test_interface_names_must_be_safe_in_full(name):
    result = check(row(name, "vxlan", **PSK))
    assert not result.tunnels and "interface name" in reason_of(result, name)


@pytest.mark.parametrize("remote_name", ["peer\n", "%any", "C=US, O=x", "peer\u202e", ""])
def test_remote_names_must_be_safe_in_full(remote_name):
    result = check(row("t", "vxlan", local_ip="10.0.0.1", remote_ip="10.0.0.2", remote_name=remote_name),
                   certificate="/c.pem", private_key="/k.pem", ca_cert="/ca.pem")
    assert not result.tunnels


def test_a_bug_in_a_rule_costs_one_tunnel(monkeypatch):
    from ovs_ipsec.validate import tunnels as rules

    real = rules.ike_options

    def broken(options):
        if "ipsec_boom" in options:
            raise KeyError("boom")
        return real(options)

    monkeypatch.setattr(rules, "ike_options", broken)
    result = check(row("bad", "vxlan", ipsec_boom="1", **PSK), row("good", "gre", **PSK))
    assert [t.name for t in result.tunnels] == ["good"]
    assert reason_of(result, "bad") == "could not be validated (KeyError); this is a bug, please report it"


def test_a_tunnel_on_the_userspace_datapath_is_unprotected_not_loaded_and_never_kept():
    netdev = replace(row("vx-dpdk", "vxlan", **PSK), datapath_type="netdev")
    kernel = replace(row("vx-kernel", "vxlan", local_ip="10.0.0.1", remote_ip="10.0.0.3", psk="x"), datapath_type="")
    broken = replace(row("vx-broken", "vxlan", psk=""), datapath_type="netdev")  # malformed too
    result = check(netdev, kernel, broken)
    assert [t.name for t in result.tunnels] == ["vx-kernel"]
    assert {i.name: i.state for i in result.invalid} == {"vx-dpdk": TunnelState.UNPROTECTED,
                                                         "vx-broken": TunnelState.UNPROTECTED}
    assert "datapath_type=netdev" in reason_of(result, "vx-dpdk") and "userspace-esp" in reason_of(result, "vx-dpdk")
    assert result.guard.uncovered == ("vx-broken", "vx-dpdk")
    # Moved from a kernel bridge to a netdev one: the old SA cannot encrypt it, so nothing is kept.
    (was,) = check(replace(netdev, datapath_type="system")).tunnels
    assert keep_last_good(result, {"vx-dpdk": was}, {}, NOW).kept == {}
