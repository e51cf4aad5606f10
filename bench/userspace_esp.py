"""Userspace ESP throughput: the bump with ESP against the same bump forwarding in plaintext.

Two namespaces joined by a veth underlay (10.250.0.1 <-> 10.250.0.2): `g` holds the bump (the
project's service loop, datapath and engine, run by esp_bump.py) on an uplink veth whose other
end plays br-phy; `s` is the remote. For each mode (plain, esp), inner packet size (1400, 64)
and direction, one generator (esp_traffic.py) sends as fast as it can for a few seconds:

    out:  generator --AF_PACKET tunnel frames--> esp-ovs=esp-gw  bump --raw IP--> underlay --> s
    in:   s --raw IP: ESP (or plain VXLAN)--> underlay --> bump --AF_PACKET--> esp-gw=esp-ovs

Figures per cell: packets the bump handled and the far side received, the bump's CPU (schedstat),
and from them Gbit/s (inner IP bytes over wall time), packets per CPU-second of the bump and
Gbit/s per core (packets per CPU-second x inner bits). The generator has the other core; the bump
is the one being measured, so per-CPU-second figures hold even when a generator falls short.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_ns, log

HERE = Path(__file__).resolve().parent
G_IP, S_IP = "10.250.0.1", "10.250.0.2"
SIZES = (1400, 64)
MODES = ("plain", "esp")
DIRECTIONS = ("out", "in")
VXLAN_OVERHEAD = 20 + 8 + 8 + 14  # outer IP, UDP, VXLAN, inner Ethernet
FAKE_BRIDGE_MAC = "02:00:00:00:00:99"  # no br-phy here: decrypted frames go to a MAC nobody has
HOLD_SOCKET = """
import socket, sys, time
kind = sys.argv[1]
if kind == "esp":
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", 4789))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
print("ready", flush=True)
sys.stdin.readline()
"""


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60).stdout


def rx_packets(netns: str, device: str) -> int:
    data = json.loads(sh("ip", "-n", netns, "-j", "-s", "link", "show", "dev", device))
    return data[0]["stats64"]["rx"]["packets"]


class Topology:
    def __init__(self, workdir: Path) -> None:
        self.prefix = "oeb" + secrets.token_hex(2)
        self.g, self.s = f"{self.prefix}g", f"{self.prefix}s"
        self.underlay_g, self.underlay_s = f"{self.prefix}u", f"{self.prefix}v"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def up(self) -> None:
        for netns in (self.g, self.s):
            sh("ip", "netns", "add", netns)
            sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.underlay_g, "netns", self.g, "type", "veth", "peer", "name", self.underlay_s,
           "netns", self.s)
        sh("ip", "-n", self.g, "addr", "add", f"{G_IP}/24", "dev", self.underlay_g)
        sh("ip", "-n", self.s, "addr", "add", f"{S_IP}/24", "dev", self.underlay_s)
        sh("ip", "-n", self.g, "link", "add", "esp-ovs", "type", "veth", "peer", "name", "esp-gw")
        for netns, device in ((self.g, self.underlay_g), (self.s, self.underlay_s), (self.g, "esp-ovs"),
                              (self.g, "esp-gw")):
            sh("ip", "-n", netns, "link", "set", device, "up")
        sh("ip", "netns", "exec", self.g, "ping", "-c", "1", "-W", "2", S_IP)

    def down(self) -> None:
        for netns in (self.g, self.s):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)


class Process:
    """A helper in a namespace that prints "ready", then waits; stopped by PID."""

    def __init__(self, netns: str, *argv: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"{argv[1] if len(argv) > 1 else argv[0]} did not start: {line} "
                               f"{self.proc.stderr.read()[-2000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        self.stop()
        return json.loads(out) if out.strip() else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def bump_counters(unixctl: str) -> dict:
    status = json.loads(sh("ovs-appctl", "-t", unixctl, "esp/show", "--json"))
    (tunnel,) = status["tunnels"]
    return {"out": tunnel["outbound"]["packets"], "in": tunnel["inbound"]["packets"],
            "drops_out": tunnel["outbound"]["drops"], "drops_in": tunnel["inbound"]["drops"]}


def run(seconds: float, workdir: Path, sizes=SIZES) -> dict:
    env = {"PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    python = sys.executable
    topo = Topology(workdir)
    key_out, key_in = "0x" + secrets.token_hex(20), "0x" + secrets.token_hex(20)
    rows = workdir / "rows"
    rows.write_text(f"local_ip={G_IP}\nremote_ip={S_IP}\nesp_out_spi=0x1001\nesp_in_spi=0x1002\n"
                    f"esp_out_key={key_out}\nesp_in_key={key_in}\n")
    rows.chmod(0o600)
    remote_key = workdir / "remote-key"
    remote_key.write_text(key_in + "\n")
    remote_key.chmod(0o600)
    cells = []
    next_seq = {"esp": 1}  # the bump's replay window remembers earlier cells: never go back
    topo.up()
    try:
        for mode in MODES:
            unixctl = str(workdir / f"bump-{mode}.ctl")
            bump = Process(topo.g, python, str(HERE / "esp_bump.py"), "--mode", mode, "--uplink", "esp-gw",
                           "--rows", str(rows), "--state-dir", str(workdir / f"state-{mode}"), "--unixctl", unixctl,
                           "--bridge-mac", FAKE_BRIDGE_MAC, env=env)
            sink = Process(topo.s, python, "-c", HOLD_SOCKET, mode, env=env)
            try:
                for size in sizes:
                    for direction in DIRECTIONS:
                        cells.append(_cell(topo, bump, unixctl, mode, size, direction, seconds, remote_key, env,
                                           next_seq))
                        c = cells[-1]
                        log(f"  userspace-esp {mode:5} {direction:3} {size:4} B: {c['gbps']:.3f} Gbit/s, "
                            f"{c['pps_per_cpu_s']:.0f} pkt per CPU-s ({c['gbps_per_core']:.2f} Gbit/s per core), "
                            f"bump CPU {c['bump_cpu_s']:.2f} s of {c['seconds']:.2f} s")
            finally:
                sink.stop()
                bump.stop()
    finally:
        topo.down()
    return {"settings": {"seconds": seconds, "sizes": list(sizes), "underlay": "veth",
                         "packet": "VXLAN over IPv4; size = inner IP packet; tunnel IP packet = size + 50 bytes"},
            "cells": cells, "ratios": _ratios(cells)}


def _cell(topo: Topology, bump: Process, unixctl: str, mode: str, size: int, direction: str, seconds: float,
          remote_key: Path, env: dict, next_seq: dict) -> dict:
    python = sys.executable
    if direction == "out":
        traffic = Process(topo.g, python, str(HERE / "esp_traffic.py"), "frames", "--device", "esp-ovs",
                          "--src", G_IP, "--dst", S_IP, "--size", str(size), "--seconds", str(seconds), env=env)
        far = (topo.s, topo.underlay_s)
    else:
        traffic = Process(topo.s, python, str(HERE / "esp_traffic.py"), "esp" if mode == "esp" else "plain",
                          "--src", S_IP, "--dst", G_IP, "--size", str(size), "--seconds", str(seconds),
                          "--spi", "0x1002", "--key-file", str(remote_key), "--first-seq", str(next_seq["esp"]),
                          env=env)
        far = (topo.g, "esp-ovs")
    before = bump_counters(unixctl)
    rx_before = rx_packets(*far)
    cpu_before = cpu_ns(bump.pid)
    started = time.perf_counter()
    generated = traffic.go()
    if direction == "in" and mode == "esp":
        next_seq["esp"] += generated.get("sent", 0)
    time.sleep(0.3)  # let the bump drain its socket queue (its CPU for that counts too)
    wall = time.perf_counter() - started
    cpu = (cpu_ns(bump.pid) - cpu_before) / 1e9
    after = bump_counters(unixctl)
    handled = after[direction] - before[direction]
    delivered = rx_packets(*far) - rx_before
    bits = size * 8
    return {
        "mode": mode, "direction": direction, "size": size, "tunnel_ip_bytes": size + VXLAN_OVERHEAD,
        "seconds": round(wall, 3), "generated": generated.get("sent"), "generator_cpu_s": generated.get("cpu_s"),
        "handled": handled, "delivered": delivered, "bump_cpu_s": round(cpu, 3),
        "pps": round(delivered / wall), "gbps": round(delivered * bits / wall / 1e9, 4),
        "pps_per_cpu_s": round(handled / cpu) if cpu else None,
        "gbps_per_core": round(handled * bits / cpu / 1e9, 4) if cpu else None,
        "drops": {k: v for k, v in after.items() if k.startswith("drops") and v},
    }


def _ratios(cells: list[dict]) -> list[dict]:
    by_key = {(c["mode"], c["direction"], c["size"]): c for c in cells}
    ratios = []
    for (mode, direction, size), esp_cell in by_key.items():
        plain = by_key.get(("plain", direction, size))
        if mode != "esp" or not plain or not plain["pps_per_cpu_s"] or not esp_cell["pps_per_cpu_s"]:
            continue
        ratios.append({"direction": direction, "size": size,
                       "esp_over_plain_per_cpu_s": round(esp_cell["pps_per_cpu_s"] / plain["pps_per_cpu_s"], 3),
                       "esp_over_plain_gbps": round(esp_cell["gbps"] / plain["gbps"], 3) if plain["gbps"] else None})
    return ratios


def table(result: dict) -> str:
    lines = ["| mode | direction | inner size (B) | Gbit/s | packets/s | bump CPU (s) of wall (s) "
             "| packets per CPU-s | Gbit/s per core |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        lines.append(f"| {c['mode']} | {c['direction']} | {c['size']} | {c['gbps']:.3f} | {c['pps']:,} "
                     f"| {c['bump_cpu_s']:.2f} of {c['seconds']:.2f} | {c['pps_per_cpu_s']:,} "
                     f"| {c['gbps_per_core']:.2f} |")
    lines += ["", "| direction | inner size (B) | ESP / plain, packets per CPU-s | ESP / plain, Gbit/s |",
              "|---|---:|---:|---:|"]
    for r in result["ratios"]:
        lines.append(f"| {r['direction']} | {r['size']} | {r['esp_over_plain_per_cpu_s']:.2f}x "
                     f"| {r['esp_over_plain_gbps']:.2f}x |")
    return "\n".join(lines) + "\n"
