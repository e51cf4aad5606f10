"""Userspace ESP against kernel ESP on the same (emulated) machine: `expect = "throughput"`.

Encrypting side h1, receiving side h2 (kernel ESP on h2 in both cells, so every packet counted
was verified and decrypted by a real kernel), VXLAN-sized tunnel packets as fast as one Python
sender can make them, for a few seconds per cell:

    kernel:    UDP socket (VXLAN header + inner frame) -> h1's IP stack -> kernel XFRM transport SA
               -> wire -> h2
    userspace: tunnel frames into a veth (as br-phy would send them) -> our bump (the project's
               service loop, bench/esp_bump.py) -> raw IP socket -> wire -> h2

Per cell: packets h2's kernel decrypted on that SA (`ip -s xfrm state`) per wall second, and per
CPU-second of the process that did the ESP work (kernel ESP runs in the sender's system calls: the
sender; ours: the bump, the generator only plays br-phy). The ratio userspace / kernel is the
figure to read: the VM runs under TCG, so absolute rates are those of an emulated CPU.
"""

import json
import re
import secrets
import shutil
import subprocess
import time
import traceback
from pathlib import Path

from hosts import Topology
from monitor import PYTHON_ENV
from proc import Shell, stop_pid
from scenario import Scenario

BENCH = Path("/opt/ovs-ipsec/bench")
SPI_KERNEL, SPI_USER, SPI_BACK = 0x2001, 0x1001, 0x1002
SIZES = (1400, 64)
SECONDS = 5
HOLD_UDP = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('',4789))\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,4096)\nprint('ready',flush=True)\nsys.stdin.readline()\n")


class Helper:
    """A process in a namespace that prints "ready" and then waits for "go" (or its stop)."""

    def __init__(self, sh: Shell, netns: str, argv: list, log: Path):
        sh.note(f"$ ip netns exec {netns} {' '.join(map(str, argv))} &")
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, *map(str, argv)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "a"), text=True,
                                     env={**PYTHON_ENV, "PYTHONPATH": f"{PYTHON_ENV['PYTHONPATH']}:{BENCH}",
                                          "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                                     start_new_session=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"{argv[1] if len(argv) > 1 else argv[0]} did not start (see {log.name})")

    def go(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        return json.loads(out) if out.strip() else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_pid(self.proc.pid)
            self.proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process we started (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def sa_packets(sh: Shell, netns: str, spi: int) -> int:
    cp = sh.run(["ip", "-s", "xfrm", "state", "list", "spi", f"0x{spi:08x}"], netns=netns, check=False, quiet=True)
    m = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", cp.stdout)
    return int(m.group(2)) if m else 0


def _xfrm(sh: Shell, netns: str, work: Path, lines: list) -> None:
    batch = work / f"{netns}-xfrm-{len(lines)}.batch"   # keys: in the VM's tmpfs, never in /results
    batch.write_text("\n".join(lines) + "\n")
    batch.chmod(0o600)
    sh.run(["ip", "-batch", batch], netns=netns)


def run(sc: Scenario, results: Path, work_root: Path, say) -> dict:
    out = results / sc.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = work_root / sc.name
    sh = Shell(out / "commands.log")
    topology = Topology(sc, work, sh)
    h1, h2 = topology.hosts
    result = {**sc.summary(), "cells": [], "ratios": [], "pass": False, "error": None}
    helpers = []
    t0 = time.monotonic()
    say(f"[{sc.name}] start: userspace ESP against kernel ESP, {SECONDS} s per cell")
    try:
        topology.up()
        keys = {spi: "0x" + secrets.token_hex(20) for spi in (SPI_KERNEL, SPI_USER, SPI_BACK)}
        a, b = h1.ip, h2.ip
        sel = "proto udp dport 4789"
        # h1's kernel encrypts the kernel cell's UDP; h2's kernel decrypts both cells' ESP.
        _xfrm(sh, h1.name, work, [
            f"xfrm state add src {a} dst {b} proto esp spi 0x{SPI_KERNEL:08x} reqid 1 mode transport "
            f"aead rfc4106(gcm(aes)) {keys[SPI_KERNEL]} 128 sel src {a}/32 dst {b}/32 {sel}",
            f"xfrm policy add src {a}/32 dst {b}/32 {sel} dir out tmpl src {a} dst {b} proto esp reqid 1 mode transport"])
        _xfrm(sh, h2.name, work, [
            f"xfrm state add src {a} dst {b} proto esp spi 0x{spi:08x} reqid 1 mode transport replay-window 64 "
            f"aead rfc4106(gcm(aes)) {keys[spi]} 128 sel src {a}/32 dst {b}/32 {sel}"
            for spi in (SPI_KERNEL, SPI_USER)] + [
            f"xfrm policy add src {a}/32 dst {b}/32 {sel} dir in tmpl src {a} dst {b} proto esp reqid 1 mode transport"])
        sh.run(["ip", "link", "add", "esp-ovs", "type", "veth", "peer", "name", "esp-gw"], netns=h1.name)
        for dev in ("esp-ovs", "esp-gw"):
            sh.run(["ip", "link", "set", dev, "up"], netns=h1.name)
        rows = work / "rows"
        rows.write_text(f"local_ip={a}\nremote_ip={b}\nesp_out_spi=0x{SPI_USER:x}\nesp_in_spi=0x{SPI_BACK:x}\n"
                        f"esp_out_key={keys[SPI_USER]}\nesp_in_key={keys[SPI_BACK]}\n")
        rows.chmod(0o600)
        sink = Helper(sh, h2.name, ["python3", "-c", HOLD_UDP], out / "sink.log")
        helpers.append(sink)
        bump = Helper(sh, h1.name, ["python3", BENCH / "esp_bump.py", "--mode", "esp", "--uplink", "esp-gw",
                                    "--rows", rows, "--state-dir", work / "esp-state", "--unixctl", work / "bump.ctl",
                                    "--bridge-mac", "02:00:00:00:00:99"], out / "bump.log")
        helpers.append(bump)
        for size in SIZES:
            for impl in ("kernel", "userspace"):
                result["cells"].append(_cell(sh, h1, h2, impl, size, bump, out))
                c = result["cells"][-1]
                say(f"[{sc.name}] {impl:9} {size:4} B: {c['pps']:.0f} pkt/s, {c['pps_per_esp_cpu_s']:.0f} per "
                    "CPU-s of the ESP worker")
        by = {(c["impl"], c["size"]): c for c in result["cells"]}
        for size in SIZES:
            k, u = by[("kernel", size)], by[("userspace", size)]
            result["ratios"].append({
                "size": size,
                "userspace_over_kernel_pps": round(u["pps"] / k["pps"], 3) if k["pps"] else None,
                "userspace_over_kernel_per_esp_cpu_s": round(u["pps_per_esp_cpu_s"] / k["pps_per_esp_cpu_s"], 3)
                if k["pps_per_esp_cpu_s"] else None})
    except Exception as e:
        result["error"] = str(e)
        (out / "error.txt").write_text(traceback.format_exc())
        say(f"[{sc.name}] ERROR: {e}")
    finally:
        for helper in helpers:
            try:
                helper.stop()
            except Exception:
                pass
        topology.down()
    cells = result["cells"]
    result["pass"] = bool(not result["error"] and len(cells) == 2 * len(SIZES)
                          and all(c["decrypted_by_h2"] > 0 for c in cells))
    result["seconds"] = round(time.monotonic() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cell(sh: Shell, h1, h2, impl: str, size: int, bump: Helper, out: Path) -> dict:
    if impl == "kernel":
        traffic = Helper(sh, h1.name, ["python3", BENCH / "esp_traffic.py", "udp", "--src", h1.ip, "--dst", h2.ip,
                                       "--size", size, "--seconds", SECONDS], out / "traffic.log")
        spi, workers = SPI_KERNEL, [traffic.proc.pid]
    else:
        traffic = Helper(sh, h1.name, ["python3", BENCH / "esp_traffic.py", "frames", "--device", "esp-ovs",
                                       "--src", h1.ip, "--dst", h2.ip, "--size", size, "--seconds", SECONDS],
                         out / "traffic.log")
        spi, workers = SPI_USER, [traffic.proc.pid, bump.proc.pid]
    before = sa_packets(sh, h2.name, spi)
    cpu_before = [cpu_seconds(pid) for pid in workers]
    started = time.monotonic()
    generated = traffic.go()
    time.sleep(0.5)   # the bump drains its queue
    wall = time.monotonic() - started
    cpus = [cpu_seconds(pid) - c for pid, c in zip(workers, cpu_before, strict=True)]
    traffic.stop()
    decrypted = sa_packets(sh, h2.name, spi) - before
    # Who does the ESP work: kernel ESP runs in the sender's system calls; ours in the bump (the
    # generator only plays br-phy, and floods: what the bump cannot take is dropped at its socket).
    esp_cpu = cpus[0] if impl == "kernel" else cpus[1]
    return {"impl": impl, "size": size, "seconds": round(wall, 2), "generated": generated.get("sent"),
            "decrypted_by_h2": decrypted, "sender_cpu_s": round(cpus[0], 2),
            "bump_cpu_s": round(cpus[1], 2) if impl == "userspace" else None,
            "pps": round(decrypted / wall), "esp_cpu_s": round(esp_cpu, 2),
            "pps_per_esp_cpu_s": round(decrypted / esp_cpu) if esp_cpu else 0}
