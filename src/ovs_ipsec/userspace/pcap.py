"""`ovs-ipsec pcap-decrypt`: read a capture, decrypt its ESP, describe the tunnelled frames. Pure.

An independent oracle for the datapath: it shares the ESP codec with it but none of the packet
handling, reads what tcpdump wrote (pcap or pcapng; Ethernet, Linux cooked v1/v2 or raw IP), and
says for every ESP packet which SA it belongs to, whether it verifies, and what is inside:
VXLAN, Geneve or GRE and the inner Ethernet frame (ARP, IPv4/IPv6 with ICMP, UDP, TCP), or the
inner IP packet of a tunnel-mode SA.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections import Counter
from dataclasses import dataclass, field

from ..errors import OvsIpsecError
from . import esp
from .esp import EspError, SaCipher
from .xfrm import KnownSa

DEFAULT_PORTS = {4789: "vxlan", 6081: "geneve"}
LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_SLL, LINKTYPE_SLL2 = 0, 1, 101, 113, 276
_RAW_LINKTYPES = {LINKTYPE_RAW, 12, 14}
_PORT_OPTION = re.compile(r"(?P<kind>vxlan|geneve):(?P<port>[0-9]{1,5})")
_IPV6_EXTENSIONS = {0, 43, 60}  # hop-by-hop, routing, destination options (fragments: 44, not decoded)
_ETHERTYPES = {0x0800: "IPv4", 0x86DD: "IPv6", 0x0806: "ARP", 0x8100: "802.1Q"}
_ICMP_TYPES = {0: "echo reply", 3: "unreachable", 8: "echo request", 11: "time exceeded"}
_ICMPV6_TYPES = {1: "unreachable", 2: "packet too big", 128: "echo request", 129: "echo reply",
                 133: "router solicitation", 134: "router advertisement", 135: "neighbor solicitation",
                 136: "neighbor advertisement", 143: "MLDv2 report"}


class PcapError(OvsIpsecError):
    """The capture cannot be read."""


@dataclass(frozen=True)
class CapturedPacket:
    time: float
    linktype: int
    data: bytes


@dataclass(frozen=True)
class Decoded:
    """One ESP packet of the capture and what it carried."""

    index: int  # 1-based position in the capture
    time: float
    src: str
    dst: str
    spi: int
    seq: int
    status: str  # decrypted | unknown_spi | auth_failed | bad_padding | malformed | fragment
    next_header: int | None = None
    encapsulation: dict = field(default_factory=dict)  # {"type": "vxlan", "vni": 0, ...}
    inner: dict = field(default_factory=dict)  # the inner frame or packet, decoded
    summary: str = ""

    def as_dict(self) -> dict:
        return {"index": self.index, "time": self.time, "src": self.src, "dst": self.dst,
                "spi": f"0x{self.spi:08x}", "seq": self.seq, "status": self.status,
                "next_header": self.next_header, "encapsulation": self.encapsulation, "inner": self.inner,
                "summary": self.summary}


@dataclass(frozen=True)
class Report:
    packets: int  # every packet of the capture
    esp: tuple[Decoded, ...]
    counts: dict

    def as_dict(self) -> dict:
        return {"packets": [d.as_dict() for d in self.esp], "counts": self.counts}


# -- capture files ---------------------------------------------------------------------------------

def read_capture(data: bytes) -> list[CapturedPacket]:
    if len(data) < 4:
        raise PcapError("not a capture: too short")
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        return _read_pcapng(data)
    return _read_pcap(data)


def _read_pcap(data: bytes) -> list[CapturedPacket]:
    if len(data) < 24:
        raise PcapError("not a pcap file: shorter than its header")
    magic = data[:4]
    formats = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
               b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
    if magic not in formats:
        raise PcapError("not a pcap or pcapng file (unknown magic number)")
    order, unit = formats[magic]
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0x0FFFFFFF
    record = struct.Struct(order + "IIII")
    packets, offset = [], 24
    while offset + record.size <= len(data):
        seconds, fraction, captured, _ = record.unpack_from(data, offset)
        offset += record.size
        packets.append(CapturedPacket(seconds + fraction * unit, linktype, data[offset:offset + captured]))
        offset += captured
    return packets


def _read_pcapng(data: bytes) -> list[CapturedPacket]:
    packets: list[CapturedPacket] = []
    interfaces: list[tuple[int, float]] = []  # (linktype, seconds per timestamp unit)
    order, offset = "<", 0
    while offset + 12 <= len(data):
        block_type = struct.unpack_from(order + "I", data, offset)[0]
        if block_type == 0x0A0D0D0A:  # section header: its byte-order magic decides the order
            order = "<" if data[offset + 8:offset + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            interfaces = []
        length = struct.unpack_from(order + "I", data, offset + 4)[0]
        if length < 12 or offset + length > len(data):
            raise PcapError("pcapng block runs past the end of the file")
        body = data[offset + 8:offset + length - 4]
        if block_type == 1 and len(body) >= 8:  # interface description
            interfaces.append((struct.unpack_from(order + "H", body)[0], _pcapng_resolution(body[8:], order)))
        elif block_type == 6 and len(body) >= 20:  # enhanced packet
            interface, high, low, captured = struct.unpack_from(order + "IIII", body)
            linktype, unit = interfaces[interface] if interface < len(interfaces) else (LINKTYPE_ETHERNET, 1e-6)
            packets.append(CapturedPacket(((high << 32) | low) * unit, linktype, body[20:20 + captured]))
        elif block_type == 3 and len(body) >= 4:  # simple packet
            linktype = interfaces[0][0] if interfaces else LINKTYPE_ETHERNET
            packets.append(CapturedPacket(0.0, linktype, body[4:]))
        offset += length
    return packets


def _pcapng_resolution(options: bytes, order: str) -> float:
    offset = 0
    while offset + 4 <= len(options):
        code, length = struct.unpack_from(order + "HH", options, offset)
        if code == 0:
            break
        if code == 9 and length >= 1:  # if_tsresol
            value = options[offset + 4]
            return 2.0 ** -(value & 0x7F) if value & 0x80 else 10.0 ** -value
        offset += 4 + (length + 3) // 4 * 4
    return 1e-6


# -- link and network layers -----------------------------------------------------------------------

def network_layer(packet: CapturedPacket) -> tuple[int, bytes] | None:
    """(ethertype, the IP packet) of a captured frame, or None when it is not IP."""
    data, linktype = packet.data, packet.linktype
    if linktype == LINKTYPE_ETHERNET:
        ethertype, offset = int.from_bytes(data[12:14], "big"), 14
        while ethertype in (0x8100, 0x88A8) and len(data) >= offset + 4:
            ethertype, offset = int.from_bytes(data[offset + 2:offset + 4], "big"), offset + 4
        return ethertype, data[offset:]
    if linktype == LINKTYPE_SLL:
        return int.from_bytes(data[14:16], "big"), data[16:]
    if linktype == LINKTYPE_SLL2:
        return int.from_bytes(data[0:2], "big"), data[20:]
    if linktype in _RAW_LINKTYPES or linktype == LINKTYPE_NULL:
        ip = data[4:] if linktype == LINKTYPE_NULL else data
        if not ip:
            return None
        return (0x0800 if ip[0] >> 4 == 4 else 0x86DD), ip
    return None


def _ip_payload(ethertype: int, ip: bytes) -> tuple[str, str, int, bytes, bool] | None:
    """(src, dst, protocol, payload, is a fragment) of an IPv4 or IPv6 packet."""
    if ethertype == 0x0800 and len(ip) >= 20 and ip[0] >> 4 == 4:
        ihl = (ip[0] & 0x0F) * 4
        total = int.from_bytes(ip[2:4], "big")
        fragment = bool(int.from_bytes(ip[6:8], "big") & 0x3FFF)
        return (str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20])), ip[9],
                ip[ihl:total], fragment)
    if ethertype == 0x86DD and len(ip) >= 40 and ip[0] >> 4 == 6:
        next_header, offset = ip[6], 40
        end = 40 + int.from_bytes(ip[4:6], "big")
        while next_header in _IPV6_EXTENSIONS and len(ip) >= offset + 8:
            next_header, offset = ip[offset], offset + (ip[offset + 1] + 1) * 8
        return (str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40])), next_header,
                ip[offset:end], next_header == 44)
    return None


# -- decryption ------------------------------------------------------------------------------------

def parse_port_options(values: list[str]) -> dict[int, str]:
    ports = dict(DEFAULT_PORTS)
    for value in values:
        match = _PORT_OPTION.fullmatch(value)
        if not match or not 1 <= int(match["port"]) <= 65535:
            raise OvsIpsecError("--port takes vxlan:PORT or geneve:PORT")
        ports[int(match["port"])] = match["kind"]
    return ports


def decrypt_capture(data: bytes, sas: list[KnownSa], ports: dict[int, str] | None = None) -> Report:
    ports = ports if ports is not None else dict(DEFAULT_PORTS)
    ciphers: dict[int, list[tuple[SaCipher, KnownSa]]] = {}
    for sa in sas:
        ciphers.setdefault(sa.spi, []).append((SaCipher.create(sa.spi, sa.key), sa))
    captured = read_capture(data)
    decoded: list[Decoded] = []
    for index, packet in enumerate(captured, 1):
        layer = network_layer(packet)
        if layer is None:
            continue
        ip = _ip_payload(*layer)
        if ip is None:
            continue
        src, dst, protocol, payload, fragment = ip
        if protocol == 17 and len(payload) >= 12 and 4500 in struct.unpack_from("!HH", payload) \
                and payload[8:12] != b"\x00\x00\x00\x00":
            protocol, payload = 50, payload[8:]  # ESP in UDP (RFC 3948); a zero marker is IKE
        if protocol != 50:
            continue
        decoded.append(_decrypt_one(index, packet.time, src, dst, payload, fragment, ciphers, ports))
    return Report(len(captured), tuple(decoded), _counts(len(captured), decoded))


def _decrypt_one(index: int, time: float, src: str, dst: str, payload: bytes, fragment: bool,
                 ciphers: dict, ports: dict[int, str]) -> Decoded:
    spi, seq = struct.unpack_from("!II", payload) if len(payload) >= 8 else (0, 0)
    base = {"index": index, "time": time, "src": src, "dst": dst, "spi": spi, "seq": seq}
    if fragment:
        return Decoded(**base, status="fragment", summary="IP fragment (not reassembled)")
    candidates = [(c, sa) for c, sa in ciphers.get(spi, []) if sa.dst in (None, dst)]
    if not candidates:
        return Decoded(**base, status="unknown_spi", summary="no key for this SPI")
    status = "malformed"
    for cipher, sa in candidates:
        try:
            # ESN: the high half is not on the wire; 0 holds for the first 2^32 packets of an SA.
            opened = esp.open_esp(cipher, payload, seq_hi=0 if sa.esn else None)
        except EspError as exc:
            status = exc.counter
            continue
        encapsulation, inner, summary = describe_payload(opened.next_header, opened.payload, ports)
        return Decoded(**base, status="decrypted", next_header=opened.next_header, encapsulation=encapsulation,
                       inner=inner, summary=summary)
    return Decoded(**base, status=status, summary=status.replace("_", " "))


def _counts(total: int, decoded: list[Decoded]) -> dict:
    statuses = Counter(d.status for d in decoded)
    kinds = Counter(d.encapsulation.get("type", "none") for d in decoded if d.status == "decrypted")
    inner = Counter(d.inner.get("kind", "other") for d in decoded if d.status == "decrypted")
    per_sa: dict[str, dict] = {}
    for d in decoded:
        entry = per_sa.setdefault(f"0x{d.spi:08x}", {"packets": 0, "decrypted": 0, "first_seq": d.seq,
                                                      "last_seq": d.seq, "duplicate_seq": 0, "seen": set()})
        entry["packets"] += 1
        entry["decrypted"] += d.status == "decrypted"
        entry["last_seq"] = d.seq
        entry["duplicate_seq"] += d.seq in entry["seen"]
        entry["seen"].add(d.seq)
    for entry in per_sa.values():
        del entry["seen"]
    return {"packets": total, "esp": len(decoded), "decrypted": statuses.get("decrypted", 0),
            "status": dict(statuses), "encapsulation": dict(kinds), "inner": dict(inner), "sa": per_sa}


# -- what is inside --------------------------------------------------------------------------------

def describe_payload(next_header: int, payload: bytes, ports: dict[int, str]) -> tuple[dict, dict, str]:
    """(encapsulation, inner, one-line summary) of a decrypted ESP payload."""
    if next_header == 17 and len(payload) >= 8:
        sport, dport, length = struct.unpack_from("!HHH", payload)
        kind = ports.get(dport)
        if kind == "vxlan" and len(payload) >= 16:
            vni = int.from_bytes(payload[12:15], "big")
            encapsulation = {"type": "vxlan", "sport": sport, "dport": dport, "vni": vni}
            inner = describe_ethernet(payload[16:])
            return encapsulation, inner, f"VXLAN vni {vni}: {inner['summary']}"
        if kind == "geneve" and len(payload) >= 16:
            options = (payload[8] & 0x3F) * 4
            protocol = int.from_bytes(payload[10:12], "big")
            vni = int.from_bytes(payload[12:15], "big")
            encapsulation = {"type": "geneve", "sport": sport, "dport": dport, "vni": vni, "options_len": options}
            inner = describe_ethernet(payload[16 + options:]) if protocol == 0x6558 else \
                {"kind": "other", "summary": f"protocol 0x{protocol:04x}"}
            return encapsulation, inner, f"Geneve vni {vni}: {inner['summary']}"
        udp = {"type": "udp", "sport": sport, "dport": dport}
        return udp, {"kind": "udp", "summary": f"{length - 8} bytes"}, f"UDP {sport} > {dport}, {length - 8} bytes"
    if next_header == 47 and len(payload) >= 4:
        flags, protocol = struct.unpack_from("!HH", payload)
        offset = 4 + 4 * bool(flags & 0x8000)
        key = int.from_bytes(payload[offset:offset + 4], "big") if flags & 0x2000 else None
        offset += 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000)
        encapsulation = {"type": "gre", "protocol": f"0x{protocol:04x}", "key": key}
        if protocol == 0x6558:
            inner = describe_ethernet(payload[offset:])
        elif protocol in (0x0800, 0x86DD):
            inner = describe_ip(protocol, payload[offset:])
        else:
            inner = {"kind": "other", "summary": f"protocol 0x{protocol:04x}"}
        shown = f" key {key}" if key is not None else ""
        return encapsulation, inner, f"GRE{shown}: {inner['summary']}"
    if next_header in (4, 41):  # tunnel mode: the inner IP packet itself
        inner = describe_ip(0x0800 if next_header == 4 else 0x86DD, payload)
        return {"type": "ip-in-esp"}, inner, inner["summary"]
    return {"type": f"next-header-{next_header}"}, {"kind": "other", "summary": f"{len(payload)} bytes"}, \
        f"next header {next_header}, {len(payload)} bytes"


def _mac(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def describe_ethernet(frame: bytes) -> dict:
    if len(frame) < 14:
        return {"kind": "truncated", "summary": "truncated Ethernet frame"}
    dst, src, ethertype = _mac(frame[0:6]), _mac(frame[6:12]), int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0806 and len(frame) >= 42:
        op = int.from_bytes(frame[20:22], "big")
        sender, target = str(ipaddress.IPv4Address(frame[28:32])), str(ipaddress.IPv4Address(frame[38:42]))
        what = f"who-has {target} tell {sender}" if op == 1 else f"{sender} is-at {_mac(frame[22:28])}"
        inner: dict = {"kind": "arp-request" if op == 1 else "arp-reply", "arp_op": op, "sender_ip": sender,
                 "target_ip": target}
        summary = f"ARP {what}"
    elif ethertype in (0x0800, 0x86DD):
        inner = describe_ip(ethertype, frame[14:])
        summary = inner["summary"]
    else:
        inner = {"kind": "other"}
        summary = f"ethertype 0x{ethertype:04x} ({_ETHERTYPES.get(ethertype, 'unknown')}), {len(frame)} bytes"
    return {**inner, "src_mac": src, "dst_mac": dst, "ethertype": f"0x{ethertype:04x}", "length": len(frame),
            "summary": f"{src} > {dst} {summary}"}


def describe_ip(ethertype: int, packet: bytes) -> dict:
    ip = _ip_payload(ethertype, packet)
    if ip is None:
        return {"kind": "other", "summary": "not an IP packet"}
    src, dst, protocol, payload, fragment = ip
    base = {"src": src, "dst": dst, "protocol": protocol, "ip_length": len(packet)}
    where = f"IP{'6' if ethertype == 0x86DD else ''} {src} > {dst}"
    if fragment:
        return {**base, "kind": "fragment", "summary": f"{where}: fragment"}
    if protocol in (1, 58) and len(payload) >= 4:
        kind_names = _ICMP_TYPES if protocol == 1 else _ICMPV6_TYPES
        icmp_type, code = payload[0], payload[1]
        name = kind_names.get(icmp_type, f"type {icmp_type}")
        detail = {"icmp_type": icmp_type, "icmp_code": code}
        text = name
        if icmp_type in ((0, 8) if protocol == 1 else (128, 129)) and len(payload) >= 8:
            ident, seq = struct.unpack_from("!HH", payload, 4)
            detail.update(icmp_id=ident, icmp_seq=seq)
            text = f"{name} id {ident} seq {seq}"
        elif protocol == 1 and icmp_type == 3 and code == 4 and len(payload) >= 8:
            detail["mtu"] = int.from_bytes(payload[6:8], "big")
            text = f"fragmentation needed, mtu {detail['mtu']}"
        elif protocol == 58 and icmp_type == 2 and len(payload) >= 8:
            detail["mtu"] = int.from_bytes(payload[4:8], "big")
            text = f"packet too big, mtu {detail['mtu']}"
        kind = ("icmp" if protocol == 1 else "icmpv6") + "-" + name.replace(" ", "-")
        return {**base, **detail, "kind": kind, "summary": f"{where}: ICMP{'6' if protocol == 58 else ''} {text}"}
    if protocol in (6, 17) and len(payload) >= 4:
        sport, dport = struct.unpack_from("!HH", payload)
        name = "TCP" if protocol == 6 else "UDP"
        return {**base, "kind": name.lower(), "sport": sport, "dport": dport,
                "summary": f"{where}: {name} {sport} > {dport}, {len(payload)} bytes"}
    return {**base, "kind": f"ip-proto-{protocol}", "summary": f"{where}: protocol {protocol}"}


def render_text(report: Report) -> str:
    lines = []
    for d in report.esp:
        lines.append(f"{d.index:5d} {d.time:.6f} {d.src} > {d.dst} ESP spi 0x{d.spi:08x} seq {d.seq}: "
                     + (d.summary if d.status == "decrypted" else f"NOT DECRYPTED ({d.summary})"))
    counts = report.counts
    lines.append(f"{counts['packets']} packets, {counts['esp']} ESP, {counts['decrypted']} decrypted"
                 + "".join(f", {n} {status.replace('_', ' ')}" for status, n in sorted(counts["status"].items())
                           if status != "decrypted"))
    if counts["encapsulation"]:
        lines.append("encapsulation: " + ", ".join(f"{k} {v}" for k, v in sorted(counts["encapsulation"].items())))
    if counts["inner"]:
        lines.append("inner: " + ", ".join(f"{k} {v}" for k, v in sorted(counts["inner"].items())))
    for spi, entry in sorted(counts["sa"].items()):
        lines.append(f"SA {spi}: {entry['packets']} packets, {entry['decrypted']} decrypted, seq {entry['first_seq']}"
                     f"..{entry['last_seq']}, {entry['duplicate_seq']} repeated sequence numbers")
    return "\n".join(lines) + "\n"
