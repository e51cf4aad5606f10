"""The per-packet logic of the ESP bump: frames from br-phy in, ESP out, and back. No I/O.

`Engine.from_uplink` takes an Ethernet frame that br-phy sent down its uplink and says what to
do with it: answer an ARP request or neighbour solicitation (we are the only thing on that
link, so every next hop OVS looks for is us), or seal a tunnel packet into ESP for the wire. A
tunnel packet without an SA is dropped and counted, never forwarded: nothing leaves this path in
plaintext. `Engine.from_wire` takes an ESP packet the kernel delivered and, if it verifies,
returns the decrypted tunnel packet as a frame for br-phy, addressed to br-phy's own MAC so
OVS's native tunnelling pops it.

Per-SA state (sequence numbers, replay window, counters) is mutable and owned by the one thread
that runs the datapath: a fresh frozen object per packet would cost more than the crypto does.
What leaves the engine (`status()`) is frozen.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import esp, frames, pmtu
from .esp import EspError, ReplayWindow, SaCipher
from .sa import EspTunnel
from .seqstore import SequenceError, SequenceStore

TO_WIRE = 1  # (TO_WIRE, ip_packet, destination address text): send as an IP packet
TO_UPLINK = 2  # (TO_UPLINK, frame): send down the veth to br-phy
DROP_LOG_INTERVAL = 5.0  # seconds between two log lines about the same kind of drop
# Well-known tunnel ports: a packet to one of them without an SA is an unprotected tunnel packet
# (the log says so), not just unrelated traffic.
TUNNEL_PORTS = frozenset({4789, 6081, 7471})
IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40


class Counters:
    """Packets and bytes through one SA, and drops by reason."""

    __slots__ = ("packets", "bytes", "drops")

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.drops: dict[str, int] = {}

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def snapshot(self) -> CounterSnapshot:
        return CounterSnapshot(self.packets, self.bytes, tuple(sorted(self.drops.items())))


@dataclass(frozen=True)
class CounterSnapshot:
    packets: int = 0
    bytes: int = 0
    drops: tuple[tuple[str, int], ...] = ()

    @property
    def dropped(self) -> int:
        return sum(n for _, n in self.drops)


@dataclass(frozen=True)
class TunnelStatus:
    """One tunnel as `esp/show` reports it: SPIs, MTU and counters; never a key."""

    name: str
    kind: str
    state: str  # active | error
    reason: str | None
    local_ip: str
    remote_ip: str
    dst_port: int | None
    out_spi: int
    in_spi: int
    replay_window: int
    path_mtu: int | None
    overlay_mtu: int | None  # largest inner IP packet that fits, for an inner Ethernet frame without VLAN
    out_seq: int
    outbound: CounterSnapshot
    inbound: CounterSnapshot


@dataclass(frozen=True)
class EngineStatus:
    tunnels: tuple[TunnelStatus, ...] = ()
    counters: tuple[tuple[str, int], ...] = ()
    bridge_macs: tuple[tuple[str, str], ...] = ()  # (local IP, br-phy MAC learned for it)
    gateway_mac: str = ""


class TunnelState:
    """The live state of one tunnel's two SAs (mutable; datapath thread only)."""

    __slots__ = ("tunnel", "out_cipher", "in_cipher", "out_seq", "out_limit", "window", "out", "inbound",
                 "path_mtu", "local", "remote", "remote_text", "port", "error", "outer_len", "addr_sum")

    def __init__(self, tunnel: EspTunnel) -> None:
        self.tunnel = tunnel
        self.out_cipher = SaCipher.create(tunnel.outbound.spi, tunnel.outbound.key)
        self.in_cipher = SaCipher.create(tunnel.inbound.spi, tunnel.inbound.key)
        self.out_seq = 0  # the last number used
        self.out_limit = 0  # the last number reserved
        self.window = ReplayWindow(tunnel.replay_window)
        self.out = Counters()
        self.inbound = Counters()
        self.path_mtu: int | None = None
        self.local = tunnel.local_ip.packed
        self.remote = tunnel.remote_ip.packed
        self.remote_text = str(tunnel.remote_ip)
        self.port = tunnel.dst_port or 0
        self.error: str | None = None
        self.outer_len = IPV4_HEADER_LEN if tunnel.family == 4 else IPV6_HEADER_LEN
        # Inbound IPv4 headers differ only in a few fields: the addresses' share of the checksum
        # is summed once here.
        self.addr_sum = frames.words_sum(self.remote + self.local) if tunnel.family == 4 else 0


def overlay_mtu(tunnel: EspTunnel, path_mtu: int | None, encap_len: int) -> int | None:
    """The largest inner IP packet a tunnel carries at this path MTU (inner Ethernet, no VLAN)."""
    if path_mtu is None:
        return None
    outer = IPV4_HEADER_LEN if tunnel.family == 4 else IPV6_HEADER_LEN
    largest = esp.max_payload_len(path_mtu - outer)
    return largest - encap_len - frames.ETH_LEN if largest >= 0 else None


class DropLog:
    """At most one log line per kind of drop per interval, with the count of those not logged."""

    def __init__(self, log: logging.Logger, clock: Callable[[], float], interval: float = DROP_LOG_INTERVAL) -> None:
        self._log = log
        self._clock = clock
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, message: str) -> None:
        now = self._clock()
        last, suppressed = self._last.get(key, (None, 0))
        if last is not None and now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        self._log.warning("%s%s", message, more)
        self._last[key] = (now, 0)


class Engine:
    def __init__(self, gateway_mac: bytes, sequences: SequenceStore, log: logging.Logger,
                 clock: Callable[[], float] = time.monotonic, send_too_big: bool = True) -> None:
        self.gateway_mac = gateway_mac
        self._sequences = sequences
        self._log = log
        self._drop_log = DropLog(log, clock)
        self._send_too_big = send_too_big
        self._states: dict[str, TunnelState] = {}
        self._out: dict[tuple[bytes, int, int], TunnelState] = {}  # (remote, protocol, port)
        self._in: dict[tuple[bytes, int], TunnelState] = {}  # (local, SPI)
        self.bridge_macs: dict[bytes, bytes] = {}  # local IP -> br-phy's MAC
        self.counters: dict[str, int] = {}

    # -- configuration -------------------------------------------------------------------------

    def configure(self, tunnels: tuple[EspTunnel, ...], path_mtu: Callable[[EspTunnel], int | None]) -> None:
        """Install a new set of tunnels. A tunnel whose SAs did not change keeps its sequence
        numbers, replay window and counters; a changed SA starts afresh (new key, new window)."""
        states: dict[str, TunnelState] = {}
        for tunnel in tunnels:
            old = self._states.get(tunnel.name)
            if old is not None and old.tunnel == tunnel:
                state = old
            else:
                state = TunnelState(tunnel)
                if old is not None and old.tunnel.outbound == tunnel.outbound:
                    state.out_seq, state.out_limit, state.out = old.out_seq, old.out_limit, old.out
                    state.error = old.error
                else:
                    self._start_sequence(state)
                if old is not None and old.tunnel.inbound == tunnel.inbound \
                        and old.tunnel.replay_window == tunnel.replay_window:
                    state.window, state.inbound = old.window, old.inbound
                self._log.info("tunnel %s: userspace ESP %s, %s -> %s, SPI out 0x%08x in 0x%08x",
                               tunnel.name, "updated" if old else "active", tunnel.local_ip, tunnel.remote_ip,
                               tunnel.outbound.spi, tunnel.inbound.spi)
            state.path_mtu = path_mtu(tunnel)
            states[tunnel.name] = state
        for name in self._states.keys() - states.keys():
            self._log.info("tunnel %s: userspace ESP removed", name)
        self._states = states
        self._out = {(s.remote, s.tunnel.protocol, s.port): s for s in states.values()}
        self._in = {(s.local, s.tunnel.inbound.spi): s for s in states.values()}
        local_ips = {s.local for s in states.values()}
        self.bridge_macs = {ip: mac for ip, mac in self.bridge_macs.items() if ip in local_ips}

    def _start_sequence(self, state: TunnelState) -> None:
        sa = state.tunnel.outbound
        if state.tunnel.fresh_keys:
            # An IKE-negotiated key exists for this SA alone: its IVs cannot have been used.
            state.out_seq, state.out_limit, state.error = 0, esp.MAX_SEQ, None
            return
        try:
            state.out_seq = self._sequences.last_reserved(sa.spi, sa.key)
            state.out_limit = self._sequences.reserve(sa.spi, sa.key, state.out_seq + 1)
            state.error = None
        except SequenceError as exc:
            state.error = str(exc)
            self._log.error("tunnel %s: %s; its outbound packets are dropped", state.tunnel.name, exc)

    def update_path_mtu(self, path_mtu: Callable[[EspTunnel], int | None]) -> None:
        for state in self._states.values():
            state.path_mtu = path_mtu(state.tunnel)

    @property
    def tunnels(self) -> tuple[EspTunnel, ...]:
        return tuple(s.tunnel for s in self._states.values())

    def local_addresses(self) -> set[bytes]:
        return {s.local for s in self._states.values()}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # -- from br-phy ---------------------------------------------------------------------------

    def from_uplink(self, frame: bytes) -> tuple | None:
        ethertype = frame[12:14]
        if ethertype == frames.ETHERTYPE_IPV4:
            return self._tunnel_packet_v4(frame)
        if ethertype == frames.ETHERTYPE_ARP:
            return self._arp(frame)
        if ethertype == frames.ETHERTYPE_IPV6:
            return self._ipv6_from_uplink(frame)
        self._count("uplink_other")
        return None

    def _tunnel_packet_v4(self, frame: bytes) -> tuple | None:
        if len(frame) < frames.ETH_LEN + IPV4_HEADER_LEN:
            self._count("uplink_malformed")
            return None
        version_ihl, tos, total, ident, flags_frag, ttl, protocol, _, src, dst = \
            frames.IPV4_HEADER.unpack_from(frame, frames.ETH_LEN)
        ihl = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or ihl < IPV4_HEADER_LEN or total < ihl + 4 or frames.ETH_LEN + total > len(frame):
            self._count("uplink_malformed")
            return None
        start = frames.ETH_LEN + ihl
        state = self._tunnel_of(frame, start, protocol, src, dst)
        if state is None:
            return None
        if flags_frag & 0x3FFF:
            # OVS sets DF on tunnel packets and never fragments them: a fragment here is not ours.
            state.out.drop("fragment")
            return None
        payload = frame[start:frames.ETH_LEN + total]
        size = IPV4_HEADER_LEN + len(payload) + esp.esp_overhead(len(payload))
        if state.path_mtu is not None and size > state.path_mtu:
            return self._too_big(state, frame, payload, size)
        sealed = self._seal(state, payload, protocol)
        if sealed is None:
            return None
        # IP_HDRINCL: the kernel fills in the header checksum (and the ID when it is 0).
        header = frames.IPV4_HEADER.pack(0x45, tos, IPV4_HEADER_LEN + len(sealed), ident, flags_frag & 0x4000,
                                         ttl, frames.IPPROTO_ESP, 0, src, dst)
        return TO_WIRE, header + sealed, state.remote_text

    def _reserve(self, state: TunnelState, seq: int) -> bool:
        sa = state.tunnel.outbound
        if state.error is None:
            try:
                state.out_limit = self._sequences.reserve(sa.spi, sa.key, seq)
                return True
            except SequenceError as exc:
                state.error = str(exc)
                self._log.error("tunnel %s: %s; its outbound packets are dropped", state.tunnel.name, exc)
        state.out.drop("no_sequence_number")
        return False

    def _unprotected(self, protocol: int, port: int, dst: bytes, src: bytes) -> None:
        if protocol == frames.IPPROTO_GRE or (protocol == frames.IPPROTO_UDP and (
                port in TUNNEL_PORTS or any(s.port == port for s in self._states.values()))):
            self._count("unprotected_tunnel_packets")
            where = "GRE" if protocol == frames.IPPROTO_GRE else f"UDP port {port}"
            self._drop_log.warn(f"unprotected {len(dst)} {protocol} {port}", (
                f"dropped a tunnel packet ({where}) from {_ip_text(src)} to {_ip_text(dst)}: no userspace "
                "ESP tunnel has that local_ip, remote_ip and port, so it would leave in plaintext"))
        else:
            self._count("uplink_not_tunnel")
        return None

    def _tunnel_of(self, frame: bytes, start: int, protocol: int, src: bytes, dst: bytes) -> TunnelState | None:
        """The tunnel a packet from br-phy belongs to, by destination, protocol and UDP port; None
        (counted when it looks like tunnel traffic) when it is not one of ours."""
        port = int.from_bytes(frame[start + 2:start + 4], "big") if protocol == frames.IPPROTO_UDP else 0
        state = self._out.get((dst, protocol, port))
        if state is None or state.local != src:
            self._unprotected(protocol, port, dst, src)
            return None
        self.bridge_macs[src] = frame[6:12]  # br-phy's MAC, kept current (it can change on restart)
        return state

    def _seal(self, state: TunnelState, payload: bytes, next_header: int) -> bytes | None:
        """The ESP packet under the next sequence number, reserved on disk first when the last
        reservation is used up (None: it could not be, so nothing is sent)."""
        seq = state.out_seq + 1
        if seq > state.out_limit and not self._reserve(state, seq):
            return None
        state.out_seq = seq
        sealed = esp.seal(state.out_cipher, seq, esp.iv_for(seq), payload, next_header)
        state.out.packets += 1
        state.out.bytes += len(payload)
        return sealed

    def _too_big(self, state: TunnelState, frame: bytes, payload: bytes, size: int) -> tuple | None:
        state.out.drop("too_big")
        mtu = pmtu.inner_mtu(state.tunnel, state.path_mtu, payload)
        self._drop_log.warn(f"too_big {state.tunnel.name}", (
            f"tunnel {state.tunnel.name}: dropped a {len(payload)}-byte tunnel payload: with ESP the packet "
            f"is {size} bytes, more than the path MTU {state.path_mtu}; inner packets may be at most "
            f"{mtu if mtu is not None else 'unknown'} bytes" + (
                ", an ICMP error says so to the sender" if self._send_too_big else "")))
        if not self._send_too_big or mtu is None:
            return None
        mac = self.bridge_macs.get(state.local)
        reply = pmtu.too_big_frame(state.tunnel, frame, payload, mtu, mac, self.gateway_mac) if mac else None
        if reply is None:
            return None
        self._count("icmp_too_big_sent")
        return TO_UPLINK, reply

    def _arp(self, frame: bytes) -> tuple | None:
        arp = frames.parse_arp(frame)
        if arp is None:
            self._count("uplink_malformed")
            return None
        op, sender_mac, sender_ip, _, target_ip = arp
        locals_ = self.local_addresses()
        if sender_ip in locals_:
            self.bridge_macs[sender_ip] = sender_mac
        if op != frames.ARP_REQUEST or target_ip == sender_ip or target_ip in locals_:
            return None
        # br-phy looks for its next hop (the remote VTEP or a gateway): on this link it is us.
        self._count("arp_replies")
        return TO_UPLINK, frames.arp_frame(frames.ARP_REPLY, self.gateway_mac, self.gateway_mac, target_ip,
                                           sender_mac, sender_ip, sender_mac)

    def _ipv6_from_uplink(self, frame: bytes) -> tuple | None:
        if len(frame) < frames.ETH_LEN + IPV6_HEADER_LEN:
            self._count("uplink_malformed")
            return None
        first, payload_len, next_header, hop_limit, src, dst = frames.IPV6_HEADER.unpack_from(frame, frames.ETH_LEN)
        start = frames.ETH_LEN + IPV6_HEADER_LEN
        end = start + payload_len
        if first >> 28 != 6 or end > len(frame):
            self._count("uplink_malformed")
            return None
        if next_header == frames.IPPROTO_ICMPV6:
            return self._icmpv6(frame, start, end, src)
        # Extension headers (OVS puts none on tunnel packets) end up as not ours too.
        state = self._tunnel_of(frame, start, next_header, src, dst)
        if state is None:
            return None
        payload = frame[start:end]
        size = IPV6_HEADER_LEN + len(payload) + esp.esp_overhead(len(payload))
        if state.path_mtu is not None and size > state.path_mtu:
            return self._too_big(state, frame, payload, size)
        sealed = self._seal(state, payload, next_header)
        if sealed is None:
            return None
        header = frames.ipv6_header((first >> 20) & 0xFF, first & 0xFFFFF, len(sealed), frames.IPPROTO_ESP,
                                    hop_limit, src, dst)
        return TO_WIRE, header + sealed, state.remote_text

    def _icmpv6(self, frame: bytes, start: int, end: int, src: bytes) -> tuple | None:
        # Neighbour solicitation for a next hop: answer for it, as ARP above. Everything else
        # br-phy's kernel says (router solicitations, MLD) has no one to talk to here.
        if end - start < 24 or frame[start] != frames.ND_SOLICIT:
            if end - start >= 24 and frame[start] == frames.ND_ADVERT:
                target = frame[start + 8:start + 24]
                if target in self.local_addresses():
                    self.bridge_macs[target] = frame[6:12]
            self._count("uplink_not_tunnel")
            return None
        target = frame[start + 8:start + 24]
        locals_ = self.local_addresses()
        if src in locals_:
            self.bridge_macs[src] = frame[6:12]
        if target in locals_ or src == bytes(16):
            return None  # its own address, or duplicate address detection
        self._count("nd_replies")
        return TO_UPLINK, frames.neighbor_advertisement(self.gateway_mac, frame[6:12], target, src)

    # -- from the wire -------------------------------------------------------------------------

    def from_wire_v4(self, packet: bytes) -> bytes | None:
        """An IPv4 packet (header included, as a raw socket delivers it) carrying ESP."""
        ihl = (packet[0] & 0x0F) * 4
        src, dst = packet[12:16], packet[16:20]
        state = self._in.get((dst, int.from_bytes(packet[ihl:ihl + 4], "big")))
        if state is None:
            self._unknown_spi(packet[ihl:ihl + 4], src)
            return None
        if state.remote != src:
            state.inbound.drop("wrong_source")
            return None
        payload, protocol = self._open(state, packet[ihl:])
        if payload is None:
            return None
        mac = self.bridge_macs.get(dst)
        if mac is None:
            state.inbound.drop("bridge_mac_unknown")
            return None
        tos, ttl = packet[1], packet[8]
        flags = int.from_bytes(packet[6:8], "big") & 0x4000
        total = IPV4_HEADER_LEN + len(payload)
        ident = int.from_bytes(packet[4:6], "big")
        checksum = frames.fold(state.addr_sum + (0x4500 | tos) + total + ident + flags + (ttl << 8 | protocol))
        header = frames.IPV4_HEADER.pack(0x45, tos, total, ident, flags, ttl, protocol, checksum, src, dst)
        return mac + self.gateway_mac + frames.ETHERTYPE_IPV4 + header + payload

    def from_wire_v6(self, esp_packet: bytes, src: bytes, dst: bytes, hop_limit: int = 64,
                     traffic_class: int = 0) -> bytes | None:
        """An ESP packet from an IPv6 raw socket (no IP header: addresses come from recvmsg)."""
        if len(esp_packet) < 4:
            self._count("wire_malformed")
            return None
        state = self._in.get((dst, int.from_bytes(esp_packet[:4], "big")))
        if state is None:
            self._unknown_spi(esp_packet[:4], src)
            return None
        if state.remote != src:
            state.inbound.drop("wrong_source")
            return None
        payload, protocol = self._open(state, esp_packet)
        if payload is None:
            return None
        mac = self.bridge_macs.get(dst)
        if mac is None:
            state.inbound.drop("bridge_mac_unknown")
            return None
        header = frames.ipv6_header(traffic_class, 0, len(payload), protocol, hop_limit, src, dst)
        return mac + self.gateway_mac + frames.ETHERTYPE_IPV6 + header + payload

    def _unknown_spi(self, spi: bytes, src: bytes) -> None:
        self._count("unknown_spi")
        self._drop_log.warn(f"unknown spi {spi.hex()}", (
            f"dropped an ESP packet from {_ip_text(src)} with SPI 0x{spi.hex():0>8}: no tunnel has it as "
            "esp_in_spi for that local address"))
        return None

    def _open(self, state: TunnelState, packet: bytes) -> tuple[bytes | None, int]:
        counters = state.inbound
        if len(packet) < esp.MIN_ESP_LEN:
            counters.drop("malformed")
            return None, 0
        seq = int.from_bytes(packet[4:8], "big")
        refused = state.window.check(seq)
        if refused:
            counters.drop(refused)
            return None, 0
        try:
            opened = esp.open_esp(state.in_cipher, packet)
        except EspError as exc:
            counters.drop(exc.counter)
            self._drop_log.warn(f"{exc.counter} {state.tunnel.name}", f"tunnel {state.tunnel.name}: dropped an "
                                f"ESP packet: {exc}")
            return None, 0
        state.window = state.window.accept(seq)
        protocol, payload = opened.next_header, opened.payload
        if protocol == esp.NEXT_HEADER_DUMMY:
            counters.drop("dummy")
            return None, 0
        # RFC 4301 section 5.2: what comes out of an SA must match its selectors.
        if protocol != state.tunnel.protocol or (state.port and (
                len(payload) < 8 or int.from_bytes(payload[2:4], "big") != state.port)):
            counters.drop("selector_mismatch")
            self._drop_log.warn(f"selector {state.tunnel.name}", f"tunnel {state.tunnel.name}: dropped a "
                                "decrypted packet that is not this tunnel's traffic (protocol or port)")
            return None, 0
        counters.packets += 1
        counters.bytes += len(payload)
        return payload, protocol

    # -- housekeeping --------------------------------------------------------------------------

    def bridge_mac_requests(self) -> list[bytes]:
        """ARP requests / neighbour solicitations for every local_ip whose br-phy MAC we do not
        know yet: br-phy's kernel answers, and decrypted packets can then be addressed to it.
        The sender is the remote VTEP, whose next hop we are anyway."""
        requests = []
        for state in self._states.values():
            if state.local in self.bridge_macs:
                continue
            if state.tunnel.family == 4:
                requests.append(frames.arp_frame(frames.ARP_REQUEST, self.gateway_mac, self.gateway_mac,
                                                 state.remote, bytes(6), state.local, frames.BROADCAST))
            else:
                requests.append(frames.neighbor_solicitation(self.gateway_mac, state.remote, state.local))
        return list(dict.fromkeys(requests))

    def status(self) -> EngineStatus:
        tunnels = []
        for state in sorted(self._states.values(), key=lambda s: s.tunnel.name):
            t = state.tunnel
            tunnels.append(TunnelStatus(
                name=t.name, kind=t.kind, state="error" if state.error else "active", reason=state.error,
                local_ip=str(t.local_ip), remote_ip=str(t.remote_ip), dst_port=t.dst_port,
                out_spi=t.outbound.spi, in_spi=t.inbound.spi, replay_window=t.replay_window,
                path_mtu=state.path_mtu, overlay_mtu=overlay_mtu(t, state.path_mtu, pmtu.encap_len(t)),
                out_seq=state.out_seq, outbound=state.out.snapshot(), inbound=state.inbound.snapshot()))
        return EngineStatus(tuple(tunnels), tuple(sorted(self.counters.items())),
                            tuple(sorted((_ip_text(ip), frames.mac_text(mac)) for ip, mac in self.bridge_macs.items())),
                            frames.mac_text(self.gateway_mac))


def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))
