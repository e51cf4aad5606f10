"""Ethernet, ARP, IPv4 and IPv6 bits the datapath reads and writes. Pure.

Only what the ESP bump needs: it sits on a point-to-point link (a veth whose other end is
br-phy's uplink port), so there are no VLAN tags to handle and no real neighbours to talk to.
"""

from __future__ import annotations

import struct

ETH_LEN = 14
ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_ARP = b"\x08\x06"
ETHERTYPE_IPV6 = b"\x86\xdd"
BROADCAST = b"\xff" * 6
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
IPPROTO_GRE = 47
IPPROTO_ESP = 50
IPPROTO_ICMPV6 = 58
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV6_HEADER = struct.Struct("!IHBB16s16s")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_TEN_WORDS = struct.Struct("!10H")
ARP_REQUEST = 1
ARP_REPLY = 2
# IPv6 neighbour discovery (RFC 4861), ICMPv6 types.
ND_SOLICIT = 135
ND_ADVERT = 136


def fold(total: int) -> int:
    """One's complement sum of 16-bit words, folded and inverted: the Internet checksum."""
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def words_sum(data: bytes) -> int:
    """Sum of the 16-bit big-endian words of data (odd length padded with a zero byte)."""
    if len(data) % 2:
        data = data + b"\x00"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def ipv4_checksum(header: bytes) -> int:
    if len(header) == 20:
        return fold(sum(_TEN_WORDS.unpack(header)))
    return fold(words_sum(header))


def ipv4_header(tos: int, total_len: int, ident: int, flags_frag: int, ttl: int, protocol: int,
                src: bytes, dst: bytes) -> bytes:
    """A 20-byte IPv4 header with its checksum."""
    header = IPV4_HEADER.pack(0x45, tos, total_len, ident, flags_frag, ttl, protocol, 0, src, dst)
    return header[:10] + ipv4_checksum(header).to_bytes(2, "big") + header[12:]


def ipv6_header(traffic_class: int, flow_label: int, payload_len: int, next_header: int, hop_limit: int,
                src: bytes, dst: bytes) -> bytes:
    return IPV6_HEADER.pack((6 << 28) | (traffic_class << 20) | flow_label, payload_len, next_header,
                            hop_limit, src, dst)


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Checksum contribution of the IPv4 or IPv6 pseudo-header (RFC 768, RFC 8200 section 8.1)."""
    return words_sum(src) + words_sum(dst) + protocol + (length & 0xFFFF) + (length >> 16)


def parse_arp(frame: bytes) -> tuple[int, bytes, bytes, bytes, bytes] | None:
    """(operation, sender MAC, sender IPv4, target MAC, target IPv4) of an Ethernet/IPv4 ARP frame."""
    if len(frame) < ETH_LEN + _ARP.size:
        return None
    hrd, pro, hln, pln, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, ETH_LEN)
    if hrd != 1 or pro != 0x0800 or hln != 6 or pln != 4:
        return None
    return op, sha, spa, tha, tpa


def arp_frame(op: int, src_mac: bytes, sender_mac: bytes, sender_ip: bytes, target_mac: bytes,
              target_ip: bytes, dst_mac: bytes) -> bytes:
    return (dst_mac + src_mac + ETHERTYPE_ARP
            + _ARP.pack(1, 0x0800, 6, 4, op, sender_mac, sender_ip, target_mac, target_ip))


def solicited_node(address: bytes) -> bytes:
    """The solicited-node multicast address of an IPv6 address (RFC 4291 section 2.7.1)."""
    return bytes.fromhex("ff0200000000000000000001ff") + address[13:]


def ipv6_multicast_mac(address: bytes) -> bytes:
    return b"\x33\x33" + address[12:]


def icmpv6_packet(src: bytes, dst: bytes, body: bytes, hop_limit: int = 255) -> bytes:
    """An IPv6 packet carrying one ICMPv6 message (`body` with a zero checksum field)."""
    checksum = fold(pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(body)) + words_sum(body))
    body = body[:2] + checksum.to_bytes(2, "big") + body[4:]
    return ipv6_header(0, 0, len(body), IPPROTO_ICMPV6, hop_limit, src, dst) + body


def neighbor_solicitation(src_mac: bytes, src: bytes, target: bytes) -> bytes:
    """An Ethernet frame: who has `target`? (ND, with our link-layer address option)."""
    dst = solicited_node(target)
    body = struct.pack("!BBHI16s", ND_SOLICIT, 0, 0, 0, target) + b"\x01\x01" + src_mac
    return ipv6_multicast_mac(dst) + src_mac + ETHERTYPE_IPV6 + icmpv6_packet(src, dst, body)


def neighbor_advertisement(src_mac: bytes, dst_mac: bytes, target: bytes, dst: bytes) -> bytes:
    """An Ethernet frame: `target` is at src_mac (solicited, override; target link-layer option)."""
    body = struct.pack("!BBHI16s", ND_ADVERT, 0, 0, 0x60000000, target) + b"\x02\x01" + src_mac
    return dst_mac + src_mac + ETHERTYPE_IPV6 + icmpv6_packet(target, dst, body)


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
