"""Manual SAs from OVSDB options: what is accepted, and the reason for everything that is not."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from ovs_ipsec.userspace.sa import DEFAULT_REPLAY_WINDOW, TunnelRow, validate

KEY_A = "0x" + "11" * 16 + "a1a2a3a4"
KEY_B = "0x" + "22" * 24 + "b1b2b3b4"
KEY_C = "0x" + "33" * 32 + "c1c2c3c4"
KEY_D = "0x" + "44" * 16 + "d1d2d3d4"


def row(name="vx0", kind="vxlan", datapath="netdev", bridge="br-int", **options) -> TunnelRow:
    base = {"local_ip": "10.0.0.1", "remote_ip": "10.0.0.2", "esp_out_spi": "0x1001", "esp_in_spi": "4098",
            "esp_out_key": KEY_A, "esp_in_key": KEY_B}
    merged = {k: v for k, v in {**base, **options}.items() if v is not None}
    return TunnelRow(uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, name)), name=name, type=kind,
                     options=tuple(sorted(merged.items())), bridge=bridge, datapath_type=datapath)


def only_reason(*rows: TunnelRow) -> str:
    config = validate(list(rows))
    assert not config.tunnels, config.tunnels
    assert len(config.invalid) == 1
    return config.invalid[0].reason


def test_a_valid_vxlan_tunnel():
    config = validate([row()])
    assert not config.invalid
    (tunnel,) = config.tunnels
    assert (tunnel.name, tunnel.kind, tunnel.protocol, tunnel.dst_port) == ("vx0", "vxlan", 17, 4789)
    assert (tunnel.local_ip, tunnel.remote_ip) == (ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2"))
    assert (tunnel.outbound.spi, tunnel.inbound.spi) == (0x1001, 4098)
    assert (tunnel.outbound.key.bits, tunnel.inbound.key.bits) == (128, 192)
    assert tunnel.outbound.key.salt == bytes.fromhex("a1a2a3a4")
    assert tunnel.replay_window == DEFAULT_REPLAY_WINDOW
    assert "11" * 16 not in repr(tunnel) and "a1a2a3a4" not in repr(tunnel)


@pytest.mark.parametrize("kind, options, protocol, port", [
    ("geneve", {}, 17, 6081),
    ("vxlan", {"dst_port": "4790"}, 17, 4790),
    ("gre", {"dst_port": "ignored for gre"}, 47, None),
    ("gre", {"local_ip": "fd00::1", "remote_ip": "fd00::2"}, 47, None),
])
def test_geneve_gre_custom_port_ipv6(kind, options, protocol, port):
    (tunnel,) = validate([row(kind=kind, **options)]).tunnels
    assert (tunnel.protocol, tunnel.dst_port) == (protocol, port)


def test_aes_256_keys_and_replay_window():
    (tunnel,) = validate([row(esp_out_key=KEY_C, esp_replay_window="1024")]).tunnels
    assert tunnel.outbound.key.bits == 256 and tunnel.replay_window == 1024


HOSTILE = ["0x1001\n", " 0x1001", "0x1001 ", "0x1001;reboot", "4098\x00", "\u0661\u0662\u0663",
           "0x", "0100", "0x1_001", "$(reboot)"]


@pytest.mark.parametrize("option", ["esp_out_spi", "esp_in_spi"])
@pytest.mark.parametrize("value", HOSTILE + ["0", "255", "0x100000000", "4294967296"])
def test_malformed_spi(option, value):
    reason = only_reason(row(**{option: value}))
    assert reason.startswith("tunnel vx0: ") and f"options:{option}" in reason
    if len(value.strip()) > 3:  # shorter ones ("0", "0x", "255") are in the message's own words
        assert value.strip() not in reason.replace(f"options:{option}", "")


@pytest.mark.parametrize("option", ["esp_out_key", "esp_in_key"])
@pytest.mark.parametrize("value", [
    KEY_A[2:],  # no 0x
    KEY_A + "\n", KEY_A + "00",  # trailing garbage: 42 hex digits
    KEY_A[:-2],  # 38 hex digits: a 4-byte salt is missing a byte
    "0x" + "11" * 16,  # key without salt
    "0x" + "zz" * 20, "0x" + "11" * 19 + "1\u0661", "'" + KEY_A + "'",
])
def test_malformed_key_reason_names_the_option_never_the_value(option, value):
    reason = only_reason(row(**{option: value}))
    assert f"tunnel vx0: options:{option} must be 0x and 40, 56 or 72 hex digits" in reason
    assert "11111111" not in reason and "zz" not in reason


def test_the_same_key_in_both_directions_is_refused():
    reason = only_reason(row(esp_in_key=KEY_A))
    assert "options:esp_in_key and options:esp_out_key must be different keys" in reason
    assert KEY_A[2:12] not in reason


@pytest.mark.parametrize("value", ["31", "4097", "-1", "64\n", "0x40"])
def test_malformed_replay_window(value):
    assert "options:esp_replay_window must be a number of packets from 32 to 4096" in only_reason(
        row(esp_replay_window=value))


@pytest.mark.parametrize("missing", ["esp_out_spi", "esp_in_spi", "esp_out_key", "esp_in_key"])
def test_a_partial_configuration_names_what_is_missing(missing):
    assert f"options:{missing} is missing" in only_reason(row(**{missing: None}))


def test_unknown_esp_options_are_refused_by_name_only_when_printable():
    assert "options:esp_out_keys is not a userspace ESP option" in only_reason(row(esp_out_keys="x"))
    reason = only_reason(row(**{"esp_evil\nkey": "x"}))
    assert "an esp_ option with an unprintable name" in reason and "evil" not in reason


@pytest.mark.parametrize("kind", ["stt", "ip6gre", "vxlan\n", "internal"])
def test_unsupported_types(kind):
    reason = only_reason(row(kind=kind))
    assert "is not supported by userspace ESP (vxlan, geneve or gre)" in reason
    assert "\n" not in reason


@pytest.mark.parametrize("datapath", ["system", "", None, "netdev\n", "evil;rm"])
def test_only_netdev_bridges(datapath):
    reason = only_reason(row(datapath=datapath))
    assert "userspace ESP protects tunnels of the userspace (netdev) datapath only" in reason
    assert "evil" not in reason and "\n" not in reason


def test_a_tunnel_on_no_bridge():
    assert "is not on a bridge" in only_reason(row(bridge=None))


@pytest.mark.parametrize("ike", ["psk", "remote_cert", "remote_name"])
def test_ike_and_manual_keys_do_not_mix(ike):
    assert f"options:{ike} (IKE); configure one or the other" in only_reason(row(**{ike: "x"}))


@pytest.mark.parametrize("options, expected", [
    ({"remote_ip": "flow"}, "options:remote_ip must be a literal IPv4 or IPv6 address"),
    ({"remote_ip": "10.0.0.256"}, "options:remote_ip must be a literal IPv4 or IPv6 address"),
    ({"remote_ip": "10.0.0.2\n"}, "options:remote_ip must be a literal IPv4 or IPv6 address"),
    ({"local_ip": None}, "options:local_ip is missing"),
    ({"remote_ip": "224.0.0.1"}, "options:remote_ip must be a unicast address"),
    ({"local_ip": "0.0.0.0"}, "options:local_ip must be a unicast address"),
    ({"remote_ip": "fd00::2"}, "different address families"),
    ({"dst_port": "0"}, "options:dst_port must be a port number from 1 to 65535"),
    ({"dst_port": "65536"}, "options:dst_port must be a port number from 1 to 65535"),
])
def test_addresses_and_ports(options, expected):
    assert expected in only_reason(row(**options))


def test_an_unprintable_name_is_replaced_by_the_uuid():
    hostile = "vx0\nFAKE LOG LINE"
    reason = only_reason(row(name=hostile))
    assert "FAKE" not in reason and "\n" not in reason
    assert reason.startswith("tunnel <interface ")


def test_rows_without_esp_options_are_not_ours():
    plain = TunnelRow(uuid=str(uuid.uuid4()), name="plain", type="vxlan",
                      options=(("psk", "swordfish"), ("remote_ip", "10.0.0.2")), bridge="br0", datapath_type="")
    assert validate([plain]).tunnels == () and validate([plain]).invalid == ()


def test_collisions_refuse_both_tunnels_and_nobody_else():
    good = row(name="good", remote_ip="10.0.0.9", esp_in_spi="0x2001", esp_out_key=KEY_C, esp_in_key=KEY_D)
    same_traffic = [row(name="a1"), row(name="a2", esp_in_spi="0x3001",
                                        esp_out_key="0x" + "55" * 20, esp_in_key="0x" + "66" * 20)]
    config = validate([good, *same_traffic])
    assert [t.name for t in config.tunnels] == ["good"]
    reasons = {i.name: i.reason for i in config.invalid}
    assert "carries the same traffic" in reasons["a1"] and "as tunnel a2" in reasons["a1"]
    assert "as tunnel a1" in reasons["a2"]


def test_the_same_inbound_spi_or_key_on_two_tunnels_is_refused():
    first = row(name="t1")
    same_spi = row(name="t2", remote_ip="10.0.0.3", esp_out_key=KEY_C, esp_in_key=KEY_D)
    config = validate([first, same_spi])
    assert not config.tunnels
    assert all("uses the same options:esp_in_spi on the same local_ip" in i.reason for i in config.invalid)
    same_key = row(name="t3", remote_ip="10.0.0.4", esp_in_spi="0x7777", esp_out_key=KEY_C, esp_in_key=KEY_A)
    config = validate([first, same_key])
    assert not config.tunnels
    assert all("uses the same ESP key" in i.reason for i in config.invalid)
    assert all(KEY_A[2:10] not in i.reason for i in config.invalid)
