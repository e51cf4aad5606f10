"""Traffic for the userspace ESP benchmark, as fast as one Python process can send it.

    frames   plays br-phy: VXLAN tunnel frames (local -> remote, inner IP packet of --size bytes)
             written into the OVS end of the uplink veth with AF_PACKET; the bump seals them.
    esp      plays the remote kernel: ESP packets of the same tunnel packets, sealed here with the
             remote's outbound SA (sequence numbers 1, 2, ...), sent through a raw IP socket.
    plain    the same tunnel packets, unencrypted (the baseline's inbound direction).
    udp      the same tunnel packets through a UDP socket to --dst port 4789: the kernel adds UDP
             and IP (and ESP, where an XFRM policy says so: the lab's kernel ESP cell).

Runs for --seconds, then prints one JSON line: packets sent and this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import socket
import struct
import sys
import time

from ovs_ipsec.userspace import esp, frames
from ovs_ipsec.userspace.esp import AeadKey, SaCipher


def tunnel_payload(size: int, port: int = 4789, vni: int = 1) -> bytes:
    """UDP + VXLAN + an inner Ethernet frame whose IP packet has `size` bytes."""
    inner_ip = frames.ipv4_header(0, size, 0, 0x4000, 64, 17, bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2]))
    inner_ip += bytes(size - len(inner_ip))
    inner = bytes.fromhex("0a0000000002" "0a0000000001") + frames.ETHERTYPE_IPV4 + inner_ip
    return struct.pack("!HHHH", 49152, port, 16 + len(inner), 0) + struct.pack("!II", 0x08000000, vni << 8) + inner


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("frames", "esp", "plain", "udp"))
    parser.add_argument("--device", help="frames: the OVS end of the uplink veth")
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--size", type=int, required=True, help="inner IP packet bytes")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--spi", type=lambda v: int(v, 0))
    parser.add_argument("--key-file", help="esp: the remote's outbound key||salt (0x-hex)")
    parser.add_argument("--first-seq", type=int, default=1,
                        help="esp: the first sequence number (above what earlier cells sent: anti-replay)")
    args = parser.parse_args()
    src, dst = ipaddress.IPv4Address(args.src).packed, ipaddress.IPv4Address(args.dst).packed
    payload = tunnel_payload(args.size)
    header = frames.ipv4_header(0, 20 + len(payload), 0, 0x4000, 64, 17, src, dst)
    if args.mode == "frames":
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sock.bind((args.device, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        frame = bytes.fromhex("020000000002" "020000000001") + frames.ETHERTYPE_IPV4 + header + payload
        send, target = sock.send, None
    elif args.mode == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        target, send, packet = (args.dst, 4789), sock.sendto, payload[8:]
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        target = (args.dst, 0)
        send = sock.sendto
        packet = header + payload
    cipher = None
    if args.mode == "esp":
        with open(args.key_file) as handle:
            cipher = SaCipher.create(args.spi, AeadKey.from_material(bytes.fromhex(handle.read().strip()[2:])))
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    sent = 0
    started = time.perf_counter()
    deadline = started + args.seconds
    batch = 256
    while time.perf_counter() < deadline:
        for _ in range(batch):
            try:
                if args.mode == "frames":
                    send(frame)
                elif cipher is not None:
                    seq = args.first_seq + sent
                    sealed = esp.seal(cipher, seq, esp.iv_for(seq), payload, 17)
                    send(frames.IPV4_HEADER.pack(0x45, 0, 20 + len(sealed), 0, 0x4000, 64, 50, 0, src, dst) + sealed,
                         target)
                else:
                    send(packet, target)
                sent += 1
            except (BlockingIOError, OSError):
                pass
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"sent": sent, "seconds": elapsed, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "pid": os.getpid()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
