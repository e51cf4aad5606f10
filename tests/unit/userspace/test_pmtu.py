"""ICMP "too big" back through the tunnel: IPv6 inner packets, GRE keys, when nothing is sent."""

from __future__ import annotations

import ipaddress
import struct

from ovs_ipsec.userspace import frames, pmtu
from ovs_ipsec.userspace.sa import TunnelRow, validate

KEY_1, KEY_2 = "0x" + "01" * 20, "0x" + "02" * 20
VM_A, VM_B = bytes.fromhex("0a00000000a1"), bytes.fromhex("0a00000000b1")
BRIDGE, GATEWAY = bytes.fromhex("0200000000f1"), bytes.fromhex("0200000000f2")


def tunnel(kind: str):
    options = {"local_ip": "10.0.0.1", "remote_ip": "10.0.0.2", "esp_out_spi": "0x1001", "esp_in_spi": "0x1002",
               "esp_out_key": KEY_1, "esp_in_key": KEY_2}
    row = TunnelRow(uuid="00000000-0000-0000-0000-000000000001", name="t", type=kind,
                    options=tuple(sorted(options.items())), bridge="br-int", datapath_type="netdev")
    (result,) = validate([row]).tunnels
    return result


def inner_ipv6_ping(size: int) -> bytes:
    src, dst = ipaddress.IPv6Address("fd00:1::1").packed, ipaddress.IPv6Address("fd00:1::2").packed
    body = struct.pack("!BBHHH", 128, 0, 0, 1, 1) + b"x" * size
    return VM_B + VM_A + frames.ETHERTYPE_IPV6 + frames.ipv6_header(0, 0, len(body), 58, 64, src, dst) + body


def test_ipv6_inner_gets_packet_too_big_with_a_valid_checksum():
    t = tunnel("vxlan")
    payload = struct.pack("!HHHH", 1, 4789, 0, 0) + struct.pack("!II", 0x08000000, 7 << 8) + inner_ipv6_ping(1500)
    reply = pmtu.too_big_frame(t, b"", payload, 1396, BRIDGE, GATEWAY)
    inner = reply[14 + 20 + 16:]
    assert inner[:12] == VM_A + VM_B and inner[12:14] == frames.ETHERTYPE_IPV6
    ip = inner[14:]
    body = ip[40:]
    assert (body[0], struct.unpack_from("!I", body, 4)[0]) == (2, 1396)
    assert frames.fold(frames.pseudo_header_sum(ip[8:24], ip[24:40], 58, len(body)) + frames.words_sum(body)) == 0
    assert len(ip) <= 1280  # the error itself fits the IPv6 minimum MTU


def test_gre_keeps_its_key_and_drops_checksum_and_sequence():
    t = tunnel("gre")
    inner = VM_B + VM_A + frames.ETHERTYPE_IPV4 + frames.ipv4_header(0, 1500, 0, 0x4000, 64, 17, bytes(4), bytes(4))
    payload = struct.pack("!HH", 0xB000, 0x6558) + b"\x00\x00\x00\x00" + struct.pack("!I", 99) + b"\x00" * 4 + inner
    reply = pmtu.too_big_frame(t, b"", payload, 1424, BRIDGE, GATEWAY)
    gre = reply[14 + 20:]
    assert struct.unpack_from("!HHI", gre) == (0x2000, 0x6558, 99)
    assert pmtu.inner_mtu(t, 1500, payload) == 1500 - 20 - 34 - 16 - 14


def test_no_icmp_for_geneve_options_non_ethernet_or_errors():
    t = tunnel("geneve")
    inner = VM_B + VM_A + frames.ETHERTYPE_IPV4 + frames.ipv4_header(0, 1500, 0, 0x4000, 64, 17, bytes(4), bytes(4))
    with_options = struct.pack("!HHHH", 1, 6081, 0, 0) + struct.pack("!BBHI", 2, 0, 0x6558, 0) + b"\x00" * 8 + inner
    assert pmtu.too_big_frame(t, b"", with_options, 1400, BRIDGE, GATEWAY) is None
    icmp_error = frames.ipv4_header(0, 1500, 0, 0x4000, 64, 1, bytes(4), bytes(4)) + bytes([3, 4]) + b"\x00" * 6
    plain = struct.pack("!HHHH", 1, 6081, 0, 0) + struct.pack("!BBHI", 0, 0, 0x6558, 0)
    assert pmtu.too_big_frame(t, b"", plain + VM_B + VM_A + frames.ETHERTYPE_IPV4 + icmp_error, 1400, BRIDGE,
                              GATEWAY) is None
    arp = frames.arp_frame(1, VM_A, VM_A, bytes(4), bytes(6), bytes(4), frames.BROADCAST)
    assert pmtu.too_big_frame(t, b"", plain + arp, 1400, BRIDGE, GATEWAY) is None
