"""The userspace ESP bump as the benchmark runs it: the project's own service loop, datapath and
engine (`ovs_ipsec.userspace`), configured from a keys file instead of OVSDB (no OVS is needed to
feed it: esp_traffic.py plays br-phy).

    --mode esp     the real thing: seal / verify + open, anti-replay, counters
    --mode plain   the same process, sockets and loop, but tunnel packets cross unencrypted: the
                   "plain forwarding through the same path" baseline. Bench-only: the project has
                   no plaintext mode an operator could turn on.

Run inside the bump's network namespace; stopped with SIGTERM by the benchmark.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path

from ovs_ipsec.userspace import frames
from ovs_ipsec.userspace.datapath import Datapath, gateway_mac_for
from ovs_ipsec.userspace.engine import TO_WIRE, Engine
from ovs_ipsec.userspace.sa import TunnelRow, validate
from ovs_ipsec.userspace.seqstore import SequenceStore
from ovs_ipsec.userspace.service import EspService


class FixedReader:
    """Stands in for the OVSDB reader: one configuration, known from the start."""

    def __init__(self, rows: tuple[TunnelRow, ...]) -> None:
        self._rows = rows
        self._fresh = True

    def run(self) -> bool:
        fresh, self._fresh = self._fresh, False
        return fresh

    def wait(self, poller) -> None:
        pass

    def rows(self) -> tuple[TunnelRow, ...]:
        return self._rows

    def close(self) -> None:
        pass


class PlainEngine(Engine):
    """The engine's parsing, lookup and counting, without ESP: the baseline."""

    def _tunnel_packet_v4(self, frame: bytes):
        version_ihl, tos, total, ident, flags_frag, ttl, protocol, _, src, dst = \
            frames.IPV4_HEADER.unpack_from(frame, frames.ETH_LEN)
        ihl = (version_ihl & 0x0F) * 4
        start = frames.ETH_LEN + ihl
        port = int.from_bytes(frame[start + 2:start + 4], "big") if protocol == frames.IPPROTO_UDP else 0
        state = self._out.get((dst, protocol, port))
        if state is None or state.local != src:
            return self._unprotected(protocol, port, dst, src)
        payload = frame[start:frames.ETH_LEN + total]
        state.out.packets += 1
        state.out.bytes += len(payload)
        header = frames.IPV4_HEADER.pack(0x45, tos, 20 + len(payload), ident, flags_frag & 0x4000, ttl, protocol, 0,
                                         src, dst)
        return TO_WIRE, header + payload, state.remote_text

    def from_wire_v4(self, packet: bytes):
        ihl = (packet[0] & 0x0F) * 4
        src, dst = packet[12:16], packet[16:20]
        port = int.from_bytes(packet[ihl + 2:ihl + 4], "big")
        state = self._out.get((src, packet[9], port))  # the tunnel towards the packet's sender
        if state is None or state.local != dst:
            return None
        payload = packet[ihl:]
        mac = self.bridge_macs.get(dst)
        state.inbound.packets += 1
        state.inbound.bytes += len(payload)
        total = 20 + len(payload)
        ident = int.from_bytes(packet[4:6], "big")
        flags = int.from_bytes(packet[6:8], "big") & 0x4000
        checksum = frames.fold(state.addr_sum + (0x4500 | packet[1]) + total + ident + flags
                               + (packet[8] << 8 | packet[9]))
        header = frames.IPV4_HEADER.pack(0x45, packet[1], total, ident, flags, packet[8], packet[9], checksum, src, dst)
        return mac + self.gateway_mac + frames.ETHERTYPE_IPV4 + header + payload


class PlainDatapath(Datapath):
    """Tunnel packets arrive as UDP, not ESP: a raw IPPROTO_UDP socket takes the ESP socket's place."""

    def __init__(self, uplink: str) -> None:
        super().__init__(uplink)
        self.recv4.close()
        self.recv4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.recv4.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE, as the ESP socket
        self.recv4.setblocking(False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("esp", "plain"), required=True)
    parser.add_argument("--uplink", required=True)
    parser.add_argument("--rows", required=True, help="file: one 'key=value' option per line")
    parser.add_argument("--kind", default="vxlan")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--unixctl", required=True)
    parser.add_argument("--bridge-mac", required=True, help="the MAC decrypted frames go to (no br-phy here)")
    args = parser.parse_args()
    options = dict(line.split("=", 1) for line in Path(args.rows).read_text().split())
    rows = (TunnelRow(uuid="00000000-0000-0000-0000-000000000001", name="bench0", type=args.kind,
                      options=tuple(sorted(options.items())), bridge="br-int", datapath_type="netdev"),)
    config = validate(rows)
    if config.invalid:
        print(config.invalid[0].reason, file=sys.stderr)
        return 1
    datapath = (PlainDatapath if args.mode == "plain" else Datapath)(args.uplink)
    engine_type = PlainEngine if args.mode == "plain" else Engine
    engine = engine_type(gateway_mac_for(datapath.uplink_mac), SequenceStore(Path(args.state_dir)),
                         logging.getLogger("bench"))
    for tunnel in config.tunnels:
        engine.bridge_macs[tunnel.local_ip.packed] = bytes.fromhex(args.bridge_mac.replace(":", ""))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    service = EspService(FixedReader(rows), datapath, engine, args.unixctl)
    engine.configure(config.tunnels, datapath.path_mtu)  # before the loop: the MAC above stays
    for tunnel in config.tunnels:
        engine.bridge_macs[tunnel.local_ip.packed] = bytes.fromhex(args.bridge_mac.replace(":", ""))
    print("ready", flush=True)
    service.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
