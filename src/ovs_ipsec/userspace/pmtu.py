"""Path MTU for tunnels through the ESP bump: what fits, and telling the sender when it does not.

ESP adds 34-37 bytes to each tunnel packet. An inner packet that fitted the overlay without ESP
may not fit any more; the bump then refuses it (it cannot fragment: OVS sets DF on tunnel
packets, and a raw socket with IP_HDRINCL never fragments). To avoid a silent black hole it sends
the inner sender what a router on the path would: ICMP "fragmentation needed" (IPv4, DF set) or
ICMPv6 "packet too big", with the inner MTU that does fit, carried back *inside the tunnel* as
if it came from the remote end (the VM behind br-int knows nothing of the underlay), like
Linux's own bridged tunnels do (skb_tunnel_check_pmtu). The inner sender's kernel then lowers
its path MTU and retransmits smaller. Pure: frames in, frames out.

Not sent (the drop is still counted and logged): an inner IPv4 packet without DF (a router would
have fragmented it), an ICMP error itself, VLAN-tagged inner frames, Geneve with options (OVN
metadata cannot be turned around), and tunnel packets whose encapsulation we cannot read.
"""

from __future__ import annotations

import struct

from . import esp, frames
from .sa import EspTunnel

VXLAN_LEN = 8
GENEVE_BASE_LEN = 8
UDP_LEN = 8
ETHERTYPE_TEB = 0x6558  # transparent Ethernet bridging: GRE and Geneve carrying Ethernet frames
ICMP_QUOTE_V4 = 548  # 576-byte ICMP packets at most (RFC 1812 section 4.3.2.3)
ICMP_QUOTE_V6 = 1280 - 40 - 8  # the whole error fits the IPv6 minimum MTU (RFC 4443 section 2.4)
IPV6_MIN_MTU = 1280
IPV4_MIN_MTU = 68


def encap_len(tunnel: EspTunnel) -> int:
    """Bytes the tunnel header adds before the inner Ethernet frame (no Geneve options, GRE
    without key, checksum or sequence number): what `overlay_mtu` reports against."""
    if tunnel.kind == "gre":
        return 4
    return UDP_LEN + (VXLAN_LEN if tunnel.kind == "vxlan" else GENEVE_BASE_LEN)


def _inner_offset(tunnel: EspTunnel, payload: bytes) -> int | None:
    """Where the inner Ethernet frame starts in a tunnel payload (UDP or GRE header onwards)."""
    if tunnel.kind == "vxlan":
        return UDP_LEN + VXLAN_LEN
    if tunnel.kind == "geneve":
        if len(payload) < UDP_LEN + GENEVE_BASE_LEN:
            return None
        options = (payload[UDP_LEN] & 0x3F) * 4
        protocol = int.from_bytes(payload[UDP_LEN + 2:UDP_LEN + 4], "big")
        return UDP_LEN + GENEVE_BASE_LEN + options if protocol == ETHERTYPE_TEB else None
    if len(payload) < 4:
        return None
    flags, protocol = struct.unpack_from("!HH", payload)
    if protocol != ETHERTYPE_TEB:
        return None
    return 4 + 4 * bool(flags & 0x8000) + 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000)


def inner_mtu(tunnel: EspTunnel, path_mtu: int | None, payload: bytes) -> int | None:
    """The largest inner IP packet that fits, for this packet's own encapsulation."""
    offset = _inner_offset(tunnel, payload)
    if path_mtu is None or offset is None:
        return None
    outer = 20 if tunnel.family == 4 else 40
    largest = esp.max_payload_len(path_mtu - outer) - offset - frames.ETH_LEN
    return largest if largest > 0 else None


def too_big_frame(tunnel: EspTunnel, frame: bytes, payload: bytes, mtu: int, bridge_mac: bytes,
                  gateway_mac: bytes) -> bytes | None:
    """The frame to hand to br-phy: a tunnel packet from the remote VTEP carrying the ICMP error
    for the inner packet of `payload`, or None when no error should be sent (see above)."""
    offset = _inner_offset(tunnel, payload)
    if offset is None or len(payload) < offset + frames.ETH_LEN:
        return None
    if tunnel.kind == "geneve" and payload[UDP_LEN] & 0x3F:
        return None
    inner_eth = payload[offset:offset + frames.ETH_LEN]
    inner = payload[offset + frames.ETH_LEN:]
    ethertype = inner_eth[12:14]
    if ethertype == frames.ETHERTYPE_IPV4:
        icmp = _icmp4_frag_needed(inner, mtu)
    elif ethertype == frames.ETHERTYPE_IPV6:
        icmp = _icmp6_packet_too_big(inner, mtu)
    else:
        return None
    if icmp is None:
        return None
    # Back towards the inner sender: the inner MACs swapped.
    inner_frame = inner_eth[6:12] + inner_eth[0:6] + ethertype + icmp
    tunnel_payload = _encapsulate(tunnel, payload, inner_frame)
    src, dst = tunnel.remote_ip.packed, tunnel.local_ip.packed
    if tunnel.family == 4:
        outer = frames.ipv4_header(0, 20 + len(tunnel_payload), 0, 0x4000, 64, tunnel.protocol, src, dst)
        return bridge_mac + gateway_mac + frames.ETHERTYPE_IPV4 + outer + tunnel_payload
    outer = frames.ipv6_header(0, 0, len(tunnel_payload), tunnel.protocol, 64, src, dst)
    return bridge_mac + gateway_mac + frames.ETHERTYPE_IPV6 + outer + tunnel_payload


def _encapsulate(tunnel: EspTunnel, original: bytes, inner_frame: bytes) -> bytes:
    if tunnel.kind == "gre":
        flags = int.from_bytes(original[0:2], "big")
        key = b""
        if flags & 0x2000:
            at = 4 + 4 * bool(flags & 0x8000)
            key = original[at:at + 4]
        return struct.pack("!HH", flags & 0x2000, ETHERTYPE_TEB) + key + inner_frame
    header = original[UDP_LEN:UDP_LEN + (VXLAN_LEN if tunnel.kind == "vxlan" else GENEVE_BASE_LEN)]
    length = UDP_LEN + len(header) + len(inner_frame)
    port = tunnel.dst_port or 0
    udp = struct.pack("!HHHH", port, port, length, 0)
    body = header + inner_frame
    if tunnel.family == 6:
        # UDP over IPv6 needs its checksum (RFC 8200 section 8.1).
        src, dst = tunnel.remote_ip.packed, tunnel.local_ip.packed
        checksum = frames.fold(frames.pseudo_header_sum(src, dst, frames.IPPROTO_UDP, length)
                               + frames.words_sum(udp) + frames.words_sum(body)) or 0xFFFF
        udp = udp[:6] + checksum.to_bytes(2, "big")
    return udp + body


def _icmp4_frag_needed(inner: bytes, mtu: int) -> bytes | None:
    if len(inner) < 20:
        return None
    ihl = (inner[0] & 0x0F) * 4
    flags_frag = int.from_bytes(inner[6:8], "big")
    protocol = inner[9]
    if inner[0] >> 4 != 4 or not flags_frag & 0x4000 or flags_frag & 0x1FFF:
        return None  # not DF (a router would fragment), or not the first fragment
    if protocol == frames.IPPROTO_ICMP and len(inner) > ihl and inner[ihl] not in (0, 8, 13, 14, 15, 16, 17, 18):
        return None  # never an ICMP error about an ICMP error (RFC 1122 section 3.2.2)
    quote = inner[:ICMP_QUOTE_V4]
    body = struct.pack("!BBHHH", 3, 4, 0, 0, max(mtu, IPV4_MIN_MTU)) + quote
    body = body[:2] + frames.fold(frames.words_sum(body)).to_bytes(2, "big") + body[4:]
    src, dst = inner[16:20], inner[12:16]
    return frames.ipv4_header(0, 20 + len(body), 0, 0, 64, frames.IPPROTO_ICMP, src, dst) + body


def _icmp6_packet_too_big(inner: bytes, mtu: int) -> bytes | None:
    if len(inner) < 40 or inner[0] >> 4 != 6:
        return None
    if inner[6] == frames.IPPROTO_ICMPV6 and len(inner) > 40 and inner[40] < 128:
        return None  # an ICMPv6 error (types 0-127) gets no error back (RFC 4443 section 2.4)
    src, dst = inner[24:40], inner[8:24]
    body = struct.pack("!BBHI", 2, 0, 0, max(mtu, IPV6_MIN_MTU)) + inner[:ICMP_QUOTE_V6]
    return frames.icmpv6_packet(src, dst, body, hop_limit=64)
