"""The bump's per-packet decisions, between two engines wired back to back (no sockets)."""

from __future__ import annotations

import ipaddress
import json
import logging
import struct

import pytest

from ovs_ipsec.userspace import esp, frames
from ovs_ipsec.userspace.engine import TO_UPLINK, TO_WIRE, Engine, overlay_mtu
from ovs_ipsec.userspace.pmtu import encap_len
from ovs_ipsec.userspace.sa import TunnelRow, validate
from ovs_ipsec.userspace.seqstore import SequenceStore
from ovs_ipsec.userspace.status import ServiceStatus, render_json, render_text

A, B = "10.9.0.1", "10.9.0.2"
KEY_AB = "0x" + "ab" * 16 + "01020304"
KEY_BA = "0x" + "ba" * 16 + "05060708"
PHY_A, PHY_B = bytes.fromhex("0200000000a1"), bytes.fromhex("0200000000b1")
GW_A, GW_B = bytes.fromhex("0200000000a2"), bytes.fromhex("0200000000b2")
VM_A, VM_B = bytes.fromhex("0a00000000a3"), bytes.fromhex("0a00000000b3")


def rows(local, remote, out_spi, in_spi, out_key, in_key, kind="vxlan", **extra):
    options = {"local_ip": local, "remote_ip": remote, "esp_out_spi": out_spi, "esp_in_spi": in_spi,
               "esp_out_key": out_key, "esp_in_key": in_key, **extra}
    return [TunnelRow(uuid="00000000-0000-0000-0000-000000000001", name="tun0", type=kind,
                      options=tuple(sorted(options.items())), bridge="br-int", datapath_type="netdev")]


def engine_pair(tmp_path, kind="vxlan", path_mtu=1500, **extra):
    a = Engine(GW_A, SequenceStore(tmp_path / "a"), logging.getLogger("test.a"))
    b = Engine(GW_B, SequenceStore(tmp_path / "b"), logging.getLogger("test.b"))
    a.configure(validate(rows(A, B, "0x1001", "0x1002", KEY_AB, KEY_BA, kind, **extra)).tunnels, lambda t: path_mtu)
    b.configure(validate(rows(B, A, "0x1002", "0x1001", KEY_BA, KEY_AB, kind, **extra)).tunnels, lambda t: path_mtu)
    a.bridge_macs[ipaddress.ip_address(A).packed] = PHY_A
    b.bridge_macs[ipaddress.ip_address(B).packed] = PHY_B
    return a, b


def inner_ping(size: int = 56, df: bool = True) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"p" * size
    ip = frames.ipv4_header(0, 20 + len(icmp), 7, 0x4000 if df else 0, 64, 1,
                            bytes([10, 242, 0, 1]), bytes([10, 242, 0, 2]))
    return VM_B + VM_A + frames.ETHERTYPE_IPV4 + ip + icmp


def tunnel_frame(inner: bytes, kind: str = "vxlan", src=A, dst=B, port=None, dst_mac=GW_A, src_mac=PHY_A) -> bytes:
    port = port or {"vxlan": 4789, "geneve": 6081}.get(kind)
    if kind == "gre":
        payload, protocol = struct.pack("!HH", 0x2000, 0x6558) + struct.pack("!I", 5) + inner, 47
    else:
        header = struct.pack("!II", 0x08000000, 42 << 8) if kind == "vxlan" else struct.pack("!HHI", 0, 0x6558, 42 << 8)
        payload = struct.pack("!HHHH", 54321, port, 8 + len(header) + len(inner), 0) + header + inner
        protocol = 17
    ip = frames.ipv4_header(0, 20 + len(payload), 0, 0x4000, 64, protocol,
                            ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return dst_mac + src_mac + frames.ETHERTYPE_IPV4 + ip + payload


def drops(engine: Engine, direction: str) -> dict:
    (tunnel,) = engine.status().tunnels
    return dict(getattr(tunnel, direction).drops)


@pytest.mark.parametrize("kind", ["vxlan", "geneve", "gre"])
def test_a_tunnel_packet_crosses_as_esp_and_arrives_as_it_left(tmp_path, kind):
    a, b = engine_pair(tmp_path, kind)
    frame = tunnel_frame(inner_ping(), kind)
    action = a.from_uplink(frame)
    assert action[0] == TO_WIRE and action[2] == B
    packet = action[1]
    # Transport mode: the tunnel packet's own header, now protocol 50; DF kept.
    assert packet[9] == frames.IPPROTO_ESP and packet[12:20] == frame[26:34] and packet[6] & 0x40
    assert struct.unpack_from("!II", packet, 20) == (0x1001, 1)
    assert frame[34:] not in packet  # nothing of the tunnel payload in clear
    delivered = b.from_wire_v4(packet)
    # To br-phy's MAC, from the bump's; the IP header rebuilt with the tunnel protocol, valid checksum.
    assert delivered[:12] == PHY_B + GW_B
    assert delivered[14 + 20:] == frame[34:]
    assert delivered[14 + 9] == (47 if kind == "gre" else 17)
    assert frames.ipv4_checksum(delivered[14:34]) == 0
    assert delivered[14 + 12:14 + 20] == frame[26:34]
    (sent,) = a.status().tunnels
    (got,) = b.status().tunnels
    assert (sent.outbound.packets, got.inbound.packets, sent.out_seq) == (1, 1, 1)


def test_replayed_tampered_and_misaddressed_packets_are_dropped_and_counted(tmp_path):
    a, b = engine_pair(tmp_path)
    packets = [a.from_uplink(tunnel_frame(inner_ping()))[1] for _ in range(3)]
    assert b.from_wire_v4(packets[2]) is not None
    assert b.from_wire_v4(packets[0]) is not None  # late, within the window
    assert b.from_wire_v4(packets[2]) is None
    tampered = bytearray(packets[1])
    tampered[-1] ^= 0x80
    assert b.from_wire_v4(bytes(tampered)) is None
    assert b.from_wire_v4(packets[1]) is not None  # the forgery did not mark seq 2 as seen
    spoofed = bytearray(packets[1])
    spoofed[12:16] = bytes([10, 9, 0, 99])
    assert b.from_wire_v4(bytes(spoofed)) is None
    unknown = bytearray(packets[1])
    unknown[20:24] = struct.pack("!I", 0x9999)
    assert b.from_wire_v4(bytes(unknown)) is None
    assert drops(b, "inbound") == {"replay": 1, "auth_failed": 1, "wrong_source": 1}
    assert dict(b.status().counters)["unknown_spi"] == 1


def test_a_decrypted_packet_must_match_the_tunnels_selector(tmp_path):
    a, b = engine_pair(tmp_path)
    (state,) = a._states.values()
    payload = struct.pack("!HHHH", 1, 9999, 8, 0)  # UDP, but not to the tunnel's port
    sealed = esp.seal(state.out_cipher, 1, esp.iv_for(1), payload, 17)
    header = frames.ipv4_header(0, 20 + len(sealed), 0, 0, 64, 50, bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2]))
    assert b.from_wire_v4(header + sealed) is None
    sealed = esp.seal(state.out_cipher, 2, esp.iv_for(2), b"\x00" * 20, esp.NEXT_HEADER_DUMMY)
    assert b.from_wire_v4(frames.ipv4_header(0, 20 + len(sealed), 0, 0, 64, 50, bytes([10, 9, 0, 1]),
                                             bytes([10, 9, 0, 2])) + sealed) is None
    assert drops(b, "inbound") == {"selector_mismatch": 1, "dummy": 1}


def test_unprotected_tunnel_packets_never_leave(tmp_path, caplog):
    a, _ = engine_pair(tmp_path)
    caplog.set_level(logging.WARNING)
    for frame in (tunnel_frame(inner_ping(), dst="10.9.0.3"),  # no tunnel to that peer
                  tunnel_frame(inner_ping(), port=6081),  # a Geneve port with no SA
                  tunnel_frame(inner_ping(), src="10.9.0.7")):  # not from the tunnel's local_ip
        assert a.from_uplink(frame) is None
    assert dict(a.status().counters)["unprotected_tunnel_packets"] == 3
    assert "would leave in plaintext" in caplog.text
    assert KEY_AB[2:10] not in caplog.text


def test_arp_is_answered_for_every_next_hop_and_teaches_us_br_phys_mac(tmp_path):
    a, _ = engine_pair(tmp_path)
    a.bridge_macs.clear()
    request = frames.arp_frame(frames.ARP_REQUEST, PHY_A, PHY_A, bytes([10, 9, 0, 1]), bytes(6),
                               bytes([10, 9, 0, 2]), frames.BROADCAST)
    kind, reply = a.from_uplink(request)
    assert kind == TO_UPLINK
    assert frames.parse_arp(reply) == (frames.ARP_REPLY, GW_A, bytes([10, 9, 0, 2]), PHY_A, bytes([10, 9, 0, 1]))
    assert reply[:12] == PHY_A + GW_A
    assert a.bridge_macs == {bytes([10, 9, 0, 1]): PHY_A}
    # Gratuitous ARP and requests for br-phy's own address get no answer from us.
    own = frames.arp_frame(frames.ARP_REQUEST, PHY_A, PHY_A, bytes([10, 9, 0, 1]), bytes(6),
                           bytes([10, 9, 0, 1]), frames.BROADCAST)
    assert a.from_uplink(own) is None


def test_without_br_phys_mac_we_ask_for_it_and_drop_meanwhile(tmp_path):
    a, b = engine_pair(tmp_path)
    b.bridge_macs.clear()
    assert b.from_wire_v4(a.from_uplink(tunnel_frame(inner_ping()))[1]) is None
    assert drops(b, "inbound") == {"bridge_mac_unknown": 1}
    (request,) = b.bridge_mac_requests()
    op, sender_mac, sender_ip, _, target_ip = frames.parse_arp(request)
    assert (op, sender_mac, sender_ip, target_ip) == (frames.ARP_REQUEST, GW_B, bytes([10, 9, 0, 1]),
                                                      bytes([10, 9, 0, 2]))
    reply = frames.arp_frame(frames.ARP_REPLY, PHY_B, PHY_B, bytes([10, 9, 0, 2]), GW_B, bytes([10, 9, 0, 1]), GW_B)
    assert b.from_uplink(reply) is None
    assert b.bridge_mac_requests() == []
    assert b.from_wire_v4(a.from_uplink(tunnel_frame(inner_ping()))[1])[:6] == PHY_B


def test_too_big_is_dropped_counted_logged_and_answered_inside_the_tunnel(tmp_path, caplog):
    a, _ = engine_pair(tmp_path, path_mtu=1500)
    (status,) = a.status().tunnels
    assert status.overlay_mtu == 1416 == overlay_mtu(a.tunnels[0], 1500, encap_len(a.tunnels[0]))
    fits = inner_ping(size=1416 - 28)
    assert a.from_uplink(tunnel_frame(fits))[0] == TO_WIRE
    caplog.set_level(logging.WARNING)
    kind, icmp_frame = a.from_uplink(tunnel_frame(inner_ping(size=1417 - 28)))
    assert kind == TO_UPLINK
    assert drops(a, "outbound") == {"too_big": 1}
    assert "more than the path MTU 1500; inner packets may be at most 1416 bytes" in caplog.text
    # A tunnel packet from the remote VTEP to br-phy, same VNI, carrying ICMP 3/4 to the VM.
    assert icmp_frame[:12] == PHY_A + GW_A
    outer = icmp_frame[14:34]
    assert (outer[9], outer[12:16], outer[16:20]) == (17, bytes([10, 9, 0, 2]), bytes([10, 9, 0, 1]))
    assert struct.unpack_from("!H", icmp_frame, 36)[0] == 4789
    assert icmp_frame[42:50] == struct.pack("!II", 0x08000000, 42 << 8)
    inner = icmp_frame[50:]
    assert inner[:12] == VM_A + VM_B
    inner_ip = inner[14:34]
    assert (inner_ip[12:16], inner_ip[16:20]) == (bytes([10, 242, 0, 2]), bytes([10, 242, 0, 1]))
    icmp = inner[34:]
    assert (icmp[0], icmp[1], struct.unpack_from("!H", icmp, 6)[0]) == (3, 4, 1416)
    assert frames.fold(frames.words_sum(icmp)) == 0 and frames.ipv4_checksum(inner_ip) == 0
    # Without DF a router would have fragmented: no ICMP, the drop is still counted.
    assert a.from_uplink(tunnel_frame(inner_ping(size=1500, df=False))) is None
    assert drops(a, "outbound") == {"too_big": 2}


def test_sequence_numbers_continue_after_a_restart_and_stop_at_2_to_the_32(tmp_path):
    store = SequenceStore(tmp_path / "a", block=100)
    tunnels = validate(rows(A, B, "0x1001", "0x1002", KEY_AB, KEY_BA)).tunnels
    first = Engine(GW_A, store, logging.getLogger("test"))
    first.configure(tunnels, lambda t: 1500)
    for _ in range(150):  # crosses one reservation block
        first.from_uplink(tunnel_frame(inner_ping()))
    second = Engine(GW_A, store, logging.getLogger("test"))  # a restart: a new process, same key
    second.configure(tunnels, lambda t: 1500)
    packet = second.from_uplink(tunnel_frame(inner_ping()))[1]
    assert struct.unpack_from("!I", packet, 24)[0] == 201  # after the last reserved block: never reused
    spi, key = tunnels[0].outbound.spi, tunnels[0].outbound.key
    store.reserve(spi, key, esp.MAX_SEQ - 1)
    third = Engine(GW_A, store, logging.getLogger("test"))
    third.configure(tunnels, lambda t: 1500)
    (status,) = third.status().tunnels
    assert status.state == "error" and "used all 2^32-1 sequence numbers" in status.reason
    assert third.from_uplink(tunnel_frame(inner_ping())) is None
    assert drops(third, "outbound") == {"no_sequence_number": 1}


def test_reconfiguring_keeps_unchanged_sas_and_resets_changed_ones(tmp_path):
    a, b = engine_pair(tmp_path)
    for _ in range(3):
        b.from_wire_v4(a.from_uplink(tunnel_frame(inner_ping()))[1])
    old = a.from_uplink(tunnel_frame(inner_ping()))[1]
    b.configure(validate(rows(B, A, "0x1002", "0x1001", KEY_BA, KEY_AB)).tunnels, lambda t: 1400)
    (status,) = b.status().tunnels
    assert (status.inbound.packets, status.path_mtu) == (3, 1400)
    new_key = "0x" + "cd" * 16 + "01020304"
    b.configure(validate(rows(B, A, "0x1002", "0x1003", KEY_BA, new_key)).tunnels, lambda t: 1500)
    (status,) = b.status().tunnels
    assert status.inbound.packets == 0 and status.out_seq == 0
    assert b.from_wire_v4(old) is None  # the old SPI is gone
    assert dict(b.status().counters)["unknown_spi"] == 1


def test_status_never_contains_a_key(tmp_path):
    a, _ = engine_pair(tmp_path)
    a.from_uplink(tunnel_frame(inner_ping()))
    bad = validate(rows(A, "10.9.0.5", "0x2001", "0x2002", "0x" + "ee" * 10, KEY_BA)[0:1])
    status = ServiceStatus(a.status(), bad.invalid, "esp-gw", {})
    for text in (render_json(status), render_text(status), repr(status)):
        for key in (KEY_AB, KEY_BA, "ee" * 10):
            assert key[2:18] not in text
    document = json.loads(render_json(status))
    assert sorted(t["state"] for t in document["tunnels"]) == ["active", "invalid"]
