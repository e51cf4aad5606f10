"""The I/O adapter of the ESP bump: an AF_PACKET socket on the uplink veth, raw IP sockets on the
kernel's side. Only this module touches sockets; the decisions are the engine's.

* uplink: frames br-phy sends down its uplink port (the other end of our veth), and frames we
  hand back to it. PACKET_IGNORE_OUTGOING keeps our own frames out of our receive queue.
* wire, out: raw IPv4 sockets with IP_HDRINCL (IPPROTO_RAW) and IPv6 (IPPROTO_RAW, which implies
  IPV6_HDRINCL): the ESP packet keeps the tunnel packet's own header (addresses, TOS, TTL, DF);
  the kernel routes it, resolves the neighbour and fills in the checksum. A packet larger than
  the route's MTU is refused by the kernel with EMSGSIZE, never fragmented.
* wire, in: raw IPPROTO_ESP sockets. The kernel hands a copy of every ESP packet for a local
  address to each raw socket before its own protocol handler runs; without a matching kernel
  SA (there is none: we own these SPIs) the kernel then drops its copy.

Sockets are non-blocking and drained in batches, so one poll() serves many packets under load.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass

from .engine import TO_WIRE, Engine
from .sa import EspTunnel

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20; not in Python's socket module
IP_MTU = 14
IPV6_MTU = 24
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
IPV6_RECVHOPLIMIT = 51
IPV6_HOPLIMIT = 52
IPV6_RECVTCLASS = 66
IPV6_TCLASS = 67
SOCKET_BUFFER = 4 << 20
MAX_PACKET = 65535

log = logging.getLogger("ovs_ipsec.userspace")


def gateway_mac_for(uplink_mac: bytes) -> bytes:
    """The MAC we answer ARP with: stable for a given veth, but never the veth's own, so a frame
    for it is PACKET_OTHERHOST to the kernel on this end, which drops it instead of routing it
    (should this process be down while ip_forward is on, nothing leaks)."""
    return bytes([(uplink_mac[0] | 0x02) & 0xFE]) + uplink_mac[1:5] + bytes([uplink_mac[5] ^ 0x01])


@dataclass(frozen=True)
class DatapathCounters:
    uplink_frames: int
    wire_packets: int
    send_errors: int


class Datapath:
    def __init__(self, uplink: str) -> None:
        self.uplink_name = uplink
        self.uplink = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.uplink.bind((uplink, ETH_P_ALL))
        self.uplink.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        _big_buffers(self.uplink)
        self.uplink.setblocking(False)
        self.uplink_mac = self.uplink.getsockname()[4]
        self.send4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.recv4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ESP)
        _big_buffers(self.send4)
        _big_buffers(self.recv4)
        self.recv4.setblocking(False)
        self.send6: socket.socket | None = None
        self.recv6: socket.socket | None = None
        try:
            self.send6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.recv6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ESP)
            for option in (IPV6_RECVPKTINFO, IPV6_RECVHOPLIMIT, IPV6_RECVTCLASS):
                self.recv6.setsockopt(socket.IPPROTO_IPV6, option, 1)
            _big_buffers(self.send6)
            _big_buffers(self.recv6)
            self.recv6.setblocking(False)
        except OSError as exc:  # IPv6 disabled in this namespace: IPv4 tunnels still work
            log.info("no IPv6 raw sockets (%s): IPv6 underlays are not available", exc.strerror)
            self.send6 = self.recv6 = None
        self.uplink_frames = 0
        self.wire_packets = 0
        self.send_errors: dict[str, int] = {}
        self.mtu_changed = False

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.uplink, self.recv4, self.recv6) if s is not None]

    def close(self) -> None:
        for sock in (self.uplink, self.send4, self.recv4, self.send6, self.recv6):
            if sock is not None:
                sock.close()

    # -- the packet pump -----------------------------------------------------------------------

    def pump(self, engine: Engine, budget: int) -> int:
        """Move up to `budget` packets in each direction; return how many were handled."""
        return self._pump_uplink(engine, budget) + self._pump_wire4(engine, budget) \
            + (self._pump_wire6(engine, budget) if self.recv6 is not None else 0)

    def _pump_uplink(self, engine: Engine, budget: int) -> int:
        recv, handle, send4, send6 = self.uplink.recv, engine.from_uplink, self.send4, self.send6
        done = 0
        while done < budget:
            try:
                frame = recv(MAX_PACKET)
            except BlockingIOError:
                break
            done += 1
            action = handle(frame)
            if action is None:
                continue
            try:
                if action[0] == TO_WIRE:
                    packet = action[1]
                    if packet[0] >> 4 == 4:
                        send4.sendto(packet, (action[2], 0))
                    elif send6 is not None:
                        send6.sendto(packet, (action[2], 0))
                else:
                    self.uplink.send(action[1])
            except OSError as exc:
                self._send_failed(exc)
        self.uplink_frames += done
        return done

    def _pump_wire4(self, engine: Engine, budget: int) -> int:
        recv, handle, send = self.recv4.recv, engine.from_wire_v4, self.uplink.send
        done = 0
        while done < budget:
            try:
                packet = recv(MAX_PACKET)
            except BlockingIOError:
                break
            done += 1
            frame = handle(packet)
            if frame is not None:
                try:
                    send(frame)
                except OSError as exc:
                    self._send_failed(exc)
        self.wire_packets += done
        return done

    def _pump_wire6(self, engine: Engine, budget: int) -> int:
        assert self.recv6 is not None  # only called for sockets() it returned
        done = 0
        space = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(4) * 2
        while done < budget:
            try:
                packet, ancillary, _, source = self.recv6.recvmsg(MAX_PACKET, space)
            except BlockingIOError:
                break
            done += 1
            dst, hop_limit, traffic_class = None, 64, 0
            for level, kind, data in ancillary:
                if level != socket.IPPROTO_IPV6:
                    continue
                if kind == IPV6_PKTINFO:
                    dst = data[:16]
                elif kind == IPV6_HOPLIMIT:
                    hop_limit = int.from_bytes(data[:4], "little")
                elif kind == IPV6_TCLASS:
                    traffic_class = int.from_bytes(data[:4], "little")
            if dst is None:
                continue
            frame = engine.from_wire_v6(packet, socket.inet_pton(socket.AF_INET6, source[0].split("%")[0]),
                                        dst, hop_limit, traffic_class)
            if frame is not None:
                try:
                    self.uplink.send(frame)
                except OSError as exc:
                    self._send_failed(exc)
        self.wire_packets += done
        return done

    def _send_failed(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.send_errors[name] = self.send_errors.get(name, 0) + 1
        if exc.errno == errno.EMSGSIZE:
            self.mtu_changed = True  # the route's MTU shrank: look it up again

    def send_uplink(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                self.uplink.send(frame)
            except OSError as exc:
                self._send_failed(exc)

    # -- the kernel's view of the path ---------------------------------------------------------

    @staticmethod
    def path_mtu(tunnel: EspTunnel) -> int | None:
        """The MTU of the kernel's route to the remote VTEP (its PMTU cache included), asked
        through a connected UDP socket: no packet is sent."""
        family = socket.AF_INET if tunnel.family == 4 else socket.AF_INET6
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((str(tunnel.remote_ip), 9))
                if family == socket.AF_INET:
                    return probe.getsockopt(socket.IPPROTO_IP, IP_MTU)
                return probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
        except OSError:
            return None

    def counters(self) -> DatapathCounters:
        return DatapathCounters(self.uplink_frames, self.wire_packets, sum(self.send_errors.values()))


def _big_buffers(sock: socket.socket) -> None:
    """Deep queues absorb bursts while Python is busy with the other direction. The FORCE
    variants (root) go beyond net.core.[rw]mem_max."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def harden_uplink(name: str) -> list[str]:
    """Keep the kernel out of the uplink veth: no IPv4 forwarding from it (IPv6 off on it), so a
    tunnel packet that reaches this end while the bump is not running is dropped, not routed in
    plaintext. Returns what could not be set (for the log)."""
    problems = []
    for path, value in ((f"/proc/sys/net/ipv4/conf/{name}/forwarding", "0"),
                        (f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "1")):
        try:
            with open(path, "w") as handle:
                handle.write(value)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
    return problems


def interface_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")
