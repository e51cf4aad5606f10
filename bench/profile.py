"""Profile our monitor where the benchmark says it spends: one-tunnel changes at N, or the bulk load.

    .venv/bin/python bench/profile.py --n 5000 --changes 20 --out /tmp/prof     # py-spy of +1/-1 changes
    .venv/bin/python bench/profile.py --n 5000 --phase bulk --out /tmp/prof     # py-spy of the bulk load
    .venv/bin/python bench/profile.py --n 1000 --phase trace --out /tmp/prof      # strace of one +1
    .venv/bin/python bench/profile.py --n 5000 --phase memory --out /tmp/prof     # tracemalloc after +1/-1
    .venv/bin/python bench/profile.py --n 5000 --phase rss --out /tmp/prof        # RSS along the way
    .venv/bin/python bench/profile.py --n 1000 --phase rss --ike libreswan --out /tmp/prof   # the same on pluto

The same host, charon settings and OVSDB transactions as `run.py`'s load cell. py-spy samples the
running monitor from outside (`--idle` threads left out), so what it shows is where the wall time
of the change goes, per thread. The trace phase records one +1 with strace (every thread, with
timestamps): when the OVSDB update arrived, when each VICI request left and its answer came. The
memory phase runs the monitor under bench/memwrap.py (tracemalloc) and has it write where its live
memory was allocated once the load and a few changes are done. The rss phase runs the monitor as
it is (no tracemalloc, whose own tables would double the figures) and samples its VmRSS every
10 ms through the bulk load, the status write-back, a full resync and a few changes, so the step
that makes the peak (VmHWM) shows.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Ovsdb, PlutoConns, SpdCounter, log, remote_ip, watch  # noqa: E402
from run import CHARON_CONF, LOAD_LOCAL, LOAD_REMOTES, WORKDIR, ip  # noqa: E402

from testsupport.sandbox import Sandbox  # noqa: E402

PY_SPY = str(Path(sys.executable).parent / "py-spy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--changes", type=int, default=20, help="+1/-1 pairs to sample")
    parser.add_argument("--phase", choices=("changes", "bulk", "trace", "memory", "rss"), default="changes")
    parser.add_argument("--rate", type=int, default=2000, help="py-spy samples per second")
    parser.add_argument("--ours-flags", default="")
    parser.add_argument("--out", default="/tmp/ovs-ipsec-prof")
    parser.add_argument("--ike", choices=("strongswan", "libreswan"), default="strongswan",
                        help="libreswan: a fresh pluto; 'loaded' is counted in its log, as in run.py")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "op" + secrets.token_hex(2)
    folder = WORKDIR / f"prof-{args.n}"
    shutil.rmtree(folder, ignore_errors=True)
    with Sandbox(prefix, folder) as box:
        host = box.add_host("h", f"{LOAD_LOCAL}/16", extra_charon_conf=CHARON_CONF, ike_daemon=args.ike)
        ip(host.name, "route", "add", f"{LOAD_REMOTES}.0.0/16", "dev", host.device)
        host.start_ovsdb()
        host.start_ike_daemon()
        if args.phase == "memory":
            _start_traced(host, out / f"memory-{args.n}.txt", args.ours_flags.split())
        else:
            host.start_monitor(*args.ours_flags.split())
        pid = host.monitor_pid()
        ovsdb = Ovsdb(f"{host.workdir}/db.sock")
        spd = SpdCounter(host.name)
        if args.ike == "libreswan":  # pluto routes none of these: count its connections (3 per tunnel)
            conns = PlutoConns(host.workdir / "pluto.log", "ovsipsec-")
            spd.out = lambda: 2 * conns.count() // 3  # type: ignore[method-assign]
        tunnels = [(f"gnv{i}", LOAD_LOCAL, remote_ip(i, LOAD_REMOTES)) for i in range(1, args.n + 1)]
        spy = None
        sampler = _RssSampler(pid) if args.phase == "rss" else None
        if sampler is not None:
            time.sleep(0.5)
            sampler.mark("started")
        if args.phase == "bulk":
            spy = _spy(pid, out / f"bulk-{args.n}", args.rate)
        _, t0 = ovsdb.add_tunnels(tunnels)
        res = watch(None, lambda: spd.out() >= 2 * args.n, limit=300, quiet=0, interval=0.01, start=t0)
        log(f"N={args.n} loaded in {res.reached_at - t0:.2f} s")
        time.sleep(1.0)
        if sampler is not None:
            sampler.mark("committed", t0)
            sampler.mark("loaded in charon", res.reached_at)
            time.sleep(4.0)  # the status write-back of N rows and its echo from ovsdb-server
            sampler.mark("settled")
            host.appctl("refresh", timeout=120)
            time.sleep(1.0)
            sampler.mark("after a full resync")
        if args.phase in ("changes", "memory", "rss"):
            if args.phase == "changes":
                spy = _spy(pid, out / f"changes-{args.n}", args.rate)
                time.sleep(1.0)
            for k in range(args.changes):
                index = args.n + 1 + k
                before = spd.out()
                _, t = ovsdb.add_tunnels([(f"gnv{index}", LOAD_LOCAL, remote_ip(index, LOAD_REMOTES))])
                watch(None, lambda: spd.out() >= before + 2, limit=10, quiet=0, interval=0.001, start=t)
                time.sleep(0.15)
                before = spd.out()
                _, t = ovsdb.delete_port(ovsdb.port_uuid(f"gnv{k + 1}"))
                watch(None, lambda: spd.out() <= before - 2, limit=10, quiet=0, interval=0.001, start=t)
                time.sleep(0.15)
        if sampler is not None:
            sampler.mark(f"after {args.changes} +1/-1")
            sampler.report(out / f"rss-{args.n}.txt")
        if args.phase == "memory":
            os.kill(pid, signal.SIGUSR2)
            deadline = time.time() + 120
            while not (out / f"memory-{args.n}.txt").exists() and time.time() < deadline:
                time.sleep(0.5)
            time.sleep(2)
            status = Path(f"/proc/{pid}/status").read_text()
            log("monitor " + ", ".join(line for line in status.splitlines() if line.startswith(("VmHWM", "VmRSS"))))
        if args.phase == "trace":
            host.appctl("refresh", timeout=120)
            time.sleep(1.0)
            strace = subprocess.Popen(["strace", "-f", "-tt", "-T", "-s", "80", "-o", str(out / f"trace-{args.n}.txt"),
                                       "-e", "trace=read,write,recvfrom,sendto,recvmsg,sendmsg,poll,futex",
                                       "-p", str(pid)], stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            index = args.n + 1
            before = spd.out()
            _, t = ovsdb.add_tunnels([(f"gnv{index}", LOAD_LOCAL, remote_ip(index, LOAD_REMOTES))])
            res = watch(None, lambda: spd.out() >= before + 2, limit=10, quiet=0, interval=0.0005, start=t)
            log(f"committed at {t:.6f}, visible after {1000 * (res.reached_at - t):.2f} ms")
            time.sleep(0.5)
            strace.send_signal(signal.SIGINT)
            strace.wait(30)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        host.stop_monitor()
        spd.close()
        ovsdb.close()
    return 0


class _RssSampler:
    """The monitor's VmRSS every 10 ms in a thread, with named moments to read it against."""

    def __init__(self, pid: int) -> None:
        self._status = Path(f"/proc/{pid}/status")
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            try:
                text = self._status.read_text()
            except OSError:
                return
            kb = [int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS")]
            if not kb:
                return  # exiting: no memory left to read
            self.samples.append((time.time(), kb[0]))
            time.sleep(0.01)

    def mark(self, what: str, at: float | None = None) -> None:
        self.marks.append((time.time() if at is None else at, what))

    def report(self, path: Path) -> None:
        """Per interval between marks: the RSS at its start and end and its maximum (MB)."""
        marks = sorted(self.marks)
        lines = []
        for (start, what), (end, _) in zip(marks, marks[1:] + [(time.time(), "")], strict=True):
            inside = [kb for t, kb in self.samples if start <= t <= end] or [0]
            lines.append(f"{what:>24} .. {end - start:7.2f} s: {inside[0] / 1024:6.1f} -> {inside[-1] / 1024:6.1f} MB, "
                         f"max {max(inside) / 1024:6.1f} MB")
        peak_t, peak = max(self.samples, key=lambda sample: sample[1])
        after = [what for t, what in marks if t <= peak_t]
        lines.append(f"peak {peak / 1024:.1f} MB, {peak_t - marks[0][0]:.2f} s after start, after: "
                     f"{after[-1] if after else 'start'}")
        path.write_text("\n".join(lines) + "\n")
        for line in lines:
            log(line)


def _start_traced(host, dump: Path, extra: list[str]) -> None:
    """The monitor as Host.start_monitor starts it, under bench/memwrap.py."""
    monitor = host.monitor
    d = monitor.workdir
    argv = host.netns(sys.executable, str(Path(__file__).resolve().parent / "memwrap.py"), str(dump), "monitor",
                      host.db, *host.daemon_flags(), f"--unixctl={monitor.unixctl}", f"--pidfile={monitor.pidfile}",
                      f"--log-file={d}/ovs-monitor-ipsec.log", "--detach", "--no-chdir", "-vconsole:off", *extra)
    subprocess.run(argv, env=host.env, check=True, timeout=60)
    deadline = time.time() + 20
    while not Path(monitor.unixctl).exists() and time.time() < deadline:
        time.sleep(0.1)


def _spy(pid: int, stem: Path, rate: int) -> subprocess.Popen:
    """py-spy in raw (collapsed stacks) form: greppable, and flamegraph.pl-ready."""
    proc = subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                             "--threads", "--output", f"{stem}.txt", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return proc


if __name__ == "__main__":
    sys.exit(main())
