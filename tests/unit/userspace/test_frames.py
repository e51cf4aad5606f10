"""Ethernet/ARP/IPv4/IPv6 helpers: checksums and neighbour discovery frames."""

from __future__ import annotations

import ipaddress
import logging

from ovs_ipsec.userspace import frames
from ovs_ipsec.userspace.engine import TO_UPLINK, Engine
from ovs_ipsec.userspace.seqstore import SequenceStore

MAC = bytes.fromhex("020000000001")


def test_ipv4_header_checksum_verifies():
    header = frames.ipv4_header(0x10, 84, 0x1234, 0x4000, 64, 1, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    assert len(header) == 20 and frames.ipv4_checksum(header) == 0


def test_solicited_node_address_and_mac():
    target = ipaddress.IPv6Address("fd00:241::2").packed
    assert ipaddress.IPv6Address(frames.solicited_node(target)) == ipaddress.IPv6Address("ff02::1:ff00:2")
    assert frames.ipv6_multicast_mac(frames.solicited_node(target)) == bytes.fromhex("3333ff000002")


def test_neighbor_solicitation_and_advertisement_have_valid_checksums():
    src, target = ipaddress.IPv6Address("fd00::2").packed, ipaddress.IPv6Address("fd00::1").packed
    for frame, icmp_type in ((frames.neighbor_solicitation(MAC, src, target), frames.ND_SOLICIT),
                             (frames.neighbor_advertisement(MAC, bytes(6), target, src), frames.ND_ADVERT)):
        ip = frame[14:]
        body = ip[40:]
        assert ip[6] == frames.IPPROTO_ICMPV6 and ip[7] == 255 and body[0] == icmp_type
        assert frames.fold(frames.pseudo_header_sum(ip[8:24], ip[24:40], 58, len(body)) + frames.words_sum(body)) == 0
        assert body[8:24] == target and body[-6:] == MAC


def test_the_engine_answers_neighbor_solicitations_for_next_hops_only(tmp_path):
    engine = Engine(MAC, SequenceStore(tmp_path), logging.getLogger("test"))
    phy = bytes.fromhex("020000000009")
    local = ipaddress.IPv6Address("fd00::1").packed
    peer = ipaddress.IPv6Address("fd00::2").packed
    kind, reply = engine.from_uplink(frames.neighbor_solicitation(phy, local, peer))
    assert kind == TO_UPLINK and reply[:12] == phy + MAC and reply[14 + 40] == frames.ND_ADVERT
    assert reply[14 + 40 + 8:14 + 40 + 24] == peer
    # Duplicate address detection (unspecified source) is not answered.
    assert engine.from_uplink(frames.neighbor_solicitation(phy, bytes(16), peer)) is None
