"""`make bench`: our monitor, Debian's ovs-monitor-ipsec and the floor, side by side, in one run.

Load (per N): one private host (network namespace) with one private ovsdb-server for the whole N.
Each implementation then gets a fresh charon there, configured the same way, and the same N
Geneve PSK tunnels in one OVSDB transaction (the floor loads the same connections without OVSDB).
Each tunnel has its own remote address, so each is its own peering; ours is the responder (its
address is the higher one), so nothing initiates and no packet leaves the namespace.

LibreSwan (N = 100, 1000 by default): the same load cells on a host of their own, ours and
upstream each driving a fresh pluto (LibreSwan 4.10, extracted by scripts/setup-libreswan.sh).
Upstream's `ipsec auto --start` initiates every tunnel, so its pluto does send IKE_SA_INITs, to
remotes that never answer, inside the namespace.

Establishment (N = 100, 1000 by default): two hosts, A with one address and B with N aliases;
tunnel i joins A to B's i-th address. Both sides run the same implementation; B is configured and
loaded first, then the clock starts at A's commit and stops when A's charon has N IKE SAs up.

Everything is described in bench/README.md; results go to bench/results/latest.{json,md} and the
plot to bench/results/load_vs_n.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Meter, Ovsdb, PlutoConns, SpdCounter, charon_children, cpu_ns, cpu_ticks, established_sas, ike_sa_counts, log,
    PROPOSALS, est_b_ip, memory_kb, pluto_conn_tunnel, pluto_tunnels, remote_ip, system_jiffies, trigger, vici_session,
    wait_quiet, watch,
)

from testsupport.pluto import LIBRESWAN_ROOT  # noqa: E402
from testsupport.sandbox import Sandbox  # noqa: E402
from testsupport.upstream import upstream_monitor  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKDIR = Path("/tmp/oib")  # short: unix socket paths are limited to 107 bytes
LOAD_LOCAL = "10.210.0.1"  # higher than every remote (10.201.x.y): ours is the responder
LOAD_REMOTES = "10.201"
EST_A = "10.220.0.1"  # lower than every B alias (10.220.1.1 and up): A initiates
# The same for every charon of the run (ours, the floor's, upstream's). One charon plays up to 1000
# peers behind one address, so the per-IP half-open limit (block_threshold, default 5) and the cookie
# thresholds (30, and 3 per IP) would throttle the responder (env-feasibility 3.4); a 1-row IKE SA
# table is a linked list at 1000 SAs; and 1000 ACQUIREs at once overflow the default netlink receive
# buffer (upstream's trap-triggered SAs would silently never start).
CHARON_CONF = """threads = 16
  block_threshold = 100000
  cookie_threshold = 100000
  cookie_threshold_ip = 100000
  init_limit_half_open = 0
  ikesa_table_size = 1024
  ikesa_table_segments = 16
  plugins { kernel-netlink { receive_buffer_size = 8388608
                             force_receive_buffer_size = yes } }"""
IMPLS = ("floor", "ours", "upstream")
IKES = ("strongswan", "libreswan")
# On pluto, a monitor quiet this long after a one-tunnel change, without the change showing, has
# given up on it: neither has a timer that would finish it later.
STEP_GIVE_UP_QUIET = 5.0
DAEMON = {"strongswan": "charon", "libreswan": "pluto"}


def ip(netns: str, *args: str, batch: str | None = None) -> None:
    subprocess.run(["ip", "-n", netns, *args], input=batch, text=True, check=True, timeout=120,
                   stdout=subprocess.DEVNULL)


# -- one implementation on one host ------------------------------------------------------------

@dataclass
class Gauge:
    """What "loaded" counts, and how much of it one tunnel makes."""

    count: Callable[[], int]
    per_tunnel: int
    unit: str  # for the logs and the cut-off notes
    names: set[str] | None = None  # pluto: the connections counted


class Driver:
    """Start, drive and stop one implementation on a host, with the IKE daemon the host was made
    for (host.ike_daemon); the cell code measures it from outside."""

    impl = ""
    prefix = ""  # connection names this implementation loads into charon or pluto
    children_mon = False  # count the CPU of waited-for children (upstream spawns `ipsec ...`)
    quiet = 0.5  # seconds without CPU use that count as idle again
    pluto_conns_per_tunnel = 2  # a Geneve tunnel's in and out connections

    def __init__(self, host, charon_conf: str) -> None:
        self.host = host
        self.charon_conf = charon_conf
        self.pluto_log_start = 0  # where this cell's pluto starts writing in the host's pluto.log

    @property
    def ike(self) -> str:
        return self.host.ike_daemon

    @property
    def daemon(self) -> str:
        return DAEMON[self.ike]

    @property
    def pid(self) -> int:
        raise NotImplementedError

    @property
    def vici_path(self) -> str:
        return self.host.vici_path

    def meter(self) -> Meter:
        return Meter(self.pid, self.children_mon)

    def ike_pid(self) -> int:
        return self.host.pluto_pid if self.ike == "libreswan" else self.host.charon_pid

    def started(self) -> bool:
        try:
            return bool(self.pid and self.ike_pid())
        except Exception:
            return False

    def start_ike_daemon(self) -> None:
        """A fresh charon, or a fresh pluto with a root of its own: the files an earlier cell left in
        ipsec.d would be loaded by pluto's start-up (its addconn --autoall)."""
        if self.ike == "strongswan":
            self.host.start_charon()
            return
        pluto_log = self.host.workdir / "pluto.log"
        self.pluto_log_start = pluto_log.stat().st_size if pluto_log.exists() else 0
        shutil.rmtree(self.host.lsw_root, ignore_errors=True)
        self.host.start_pluto()

    def gauge(self, spd: SpdCounter) -> Gauge:
        """charon: its trap policies in the SPD (one OUT policy per child). pluto: its connections,
        from its log (see PlutoConns: neither implementation routes anything there)."""
        if self.ike == "strongswan":
            return Gauge(spd.out, 2, "trap policies")
        conns = PlutoConns(self.host.workdir / "pluto.log", self.prefix, self.pluto_log_start)
        return Gauge(conns.count, self.pluto_conns_per_tunnel, "pluto connections", conns.names)

    def verify(self) -> dict:
        """What the IKE daemon itself lists (asked once, after the measurement): charon over VICI,
        pluto with `whack --status`."""
        if self.ike == "strongswan":
            conns, children = charon_children(self.vici_path, self.prefix)
            return {"conns": conns, "children": children}
        return pluto_tunnels(self.host.whack("--status"), self.prefix)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Ours(Driver):
    impl, prefix = "ours", "ovsipsec-"
    # Each tunnel here is a peering of its own: its two children plus the peering's anchor.
    pluto_conns_per_tunnel = 3

    def __init__(self, host, charon_conf: str) -> None:
        super().__init__(host, charon_conf)
        # pluto is driven through `ipsec addconn|whack`: that work is in the waited-for children.
        self.children_mon = self.ike == "libreswan"

    @property
    def pid(self) -> int:
        return self.host.monitor_pid()

    extra_flags: tuple[str, ...] = ()  # --ours-flags, for experiments

    def start(self) -> None:
        self.start_ike_daemon()
        self.host.start_monitor(*self.extra_flags)

    def stop(self) -> None:
        try:
            self.host.stop_monitor(hard=False)
        except Exception as exc:  # keep tearing down
            log(f"  ours: clean exit failed ({exc}); killing it")
            self.host.stop_monitor(hard=True)
        self.host.stop_ike_daemon()

    def refresh(self) -> float:
        started = time.time()
        self.host.appctl("refresh", timeout=120)
        return time.time() - started


class Upstreams(Driver):
    impl, prefix, children_mon, quiet = "upstream", "gnv", True, 1.0

    def __init__(self, host, charon_conf: str) -> None:
        super().__init__(host, charon_conf)
        # strongSwan: its own `ipsec restart` starts its charon. LibreSwan: the host's pluto.
        self.up = upstream_monitor(host, charon_conf)

    @property
    def pid(self) -> int:
        return self.up.pid

    @property
    def vici_path(self) -> str:
        return self.up.vici_path

    def ike_pid(self) -> int:
        return self.up.charon_pid if self.ike == "strongswan" else self.host.pluto_pid

    def start(self) -> None:
        if self.ike == "libreswan":
            self.start_ike_daemon()
        self.up.start()
        log(f"  upstream monitor {self.up.pid}, IKE daemon {self.ike_pid()}")

    def stop(self) -> None:
        try:
            self.up.stop()
        finally:
            if self.ike == "libreswan":
                self.host.stop_pluto()


class Floor(Driver):
    impl, prefix = "floor", "floor-"

    def __init__(self, host, charon_conf: str, local: str, remote_base: str, proposals: str = "modern") -> None:
        super().__init__(host, charon_conf)
        self.local, self.remote_base, self.proposals = local, remote_base, proposals
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        self.host.start_charon()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "floor.py"), self.host.vici_path, self.local,
                                      self.remote_base, self.proposals], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=HERE)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def reply(self) -> tuple[float, float, float]:
        """(start, done, cpu) of the last command."""
        start = float(self.proc.stdout.readline().split()[1])
        _, done, cpu = self.proc.stdout.readline().split()
        return start, float(done), float(cpu)

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.host.stop_charon()


# -- load cells --------------------------------------------------------------------------------

def empty_row(n: int, ike: str, impl: str) -> dict:
    return {"n": n, "ike": ike, "impl": impl, "load_s": None, "add_one_s": None, "del_one_s": None,
            "cpu_s": None, "rss_mb": None, "idle_cpu_pct": None, "establish_s": None}


def load_cell(driver: Driver, n: int, ovsdb: Ovsdb, spd: SpdCounter, args) -> tuple[dict, dict]:
    impl, daemon = driver.impl, driver.daemon
    limit = args.upstream_limit if impl == "upstream" else args.limit
    row = empty_row(n, driver.ike, impl)
    detail: dict = {"n": n, "ike": driver.ike, "impl": impl}
    try:
        driver.start()
        meter = driver.meter()
        wait_quiet(meter, quiet=2.0 if impl == "upstream" else 1.0, limit=120)
        gauge = driver.gauge(spd)
        per = gauge.per_tunnel
        base = gauge.count()
        daemon0 = cpu_ticks(driver.ike_pid())[0]
        ticks0 = meter.ticks()
        own0, children0 = cpu_ticks(driver.pid)
        detail["loadavg_1min_before"] = float(Path("/proc/loadavg").read_text().split()[0])
        system0 = system_jiffies()
        tunnels = [(f"gnv{i}", LOAD_LOCAL, remote_ip(i, LOAD_REMOTES)) for i in range(1, n + 1)]

        # -- bulk: N tunnels in one transaction -----------------------------------------------
        if isinstance(driver, Floor):
            driver.send(f"load 1 {n}")
            result = watch(meter, lambda: gauge.count() >= base + per * n, limit=limit, quiet=driver.quiet,
                           interval=0.005)
            t_ref, done, client_cpu = driver.reply()
            detail["floor_loop_s"] = round(done - t_ref, 4)
            detail["floor_client_cpu_s"] = client_cpu
            result.idle_at = None  # a script, not a daemon: it has nothing to settle
        else:
            sent, t_ref = ovsdb.add_tunnels(tunnels)
            detail["ovsdb_transaction_s"] = round(t_ref - sent, 4)
            detail["bulk_commit_wall"] = round(t_ref, 4)  # to line up with the daemons' logs
            result = watch(meter, lambda: gauge.count() >= base + per * n, limit=limit, quiet=driver.quiet,
                           interval=0.005, start=t_ref)
        counted = gauge.count() - base
        system1 = system_jiffies()
        detail["machine_busy_pct_during_bulk"] = round(100 * (system1[0] - system0[0]) / max(1, system1[1] - system0[1]), 1)
        row["cpu_s"] = round(meter.ticks() - ticks0, 3)
        own1, children1 = cpu_ticks(driver.pid)
        # the monitor's own work vs the `ipsec ...` commands it ran (counted in cpu_s when children_mon)
        detail["bulk_cpu_split_s"] = {"own": round(own1 - own0, 3), "children": round(children1 - children0, 3)}
        detail["bulk_cpu_precise_s"] = round(result.cpu_s, 4)
        detail[f"{daemon}_cpu_bulk_s"] = round(cpu_ticks(driver.ike_pid())[0] - daemon0, 3)
        detail["rss_after_bulk_mb"] = round(memory_kb(driver.pid).get("VmHWM", 0) / 1024, 1)
        row["rss_mb"] = detail["rss_after_bulk_mb"]
        if result.reached_at is None:
            detail["cut_off"] = (f"not loaded after {limit:g} s: {counted // per} of {n} tunnels in {daemon} "
                                 f"({counted} of {per * n} {gauge.unit})")
            log(f"  {impl} N={n} ({driver.ike}): CUT OFF after {limit:g} s ({counted}/{per * n} {gauge.unit})")
            return row, detail
        row["load_s"] = round(result.reached_at - t_ref, 3)
        detail["bulk_idle_again_s"] = round(result.idle_at - t_ref, 3) if result.idle_at else None
        detail["verified_after_bulk"] = {**driver.verify(), f"counted_{gauge.unit.replace(' ', '_')}": counted}
        log(f"  {impl} N={n} ({driver.ike}): loaded in {row['load_s']} s (idle again {detail['bulk_idle_again_s']} s, "
            f"cpu {row['cpu_s']} s); {daemon} lists {detail['verified_after_bulk']}")

        # -- a full resync (ours does one every 60 s): measured now, which also restarts its 60 s
        # timer, so the changes and the idle window below never meet a periodic one by chance.
        if isinstance(driver, Ours):
            ns0 = meter.ns()
            wall = driver.refresh()
            wait_quiet(meter, quiet=0.5, limit=60)
            detail["resync"] = {"wall_s": round(wall, 4), "cpu_s": round((meter.ns() - ns0) / 1e9, 4)}
            log(f"  ours N={n}: one full resync: {detail['resync']}")

        # -- one more tunnel, then one fewer ---------------------------------------------------
        step_limit = args.upstream_step_limit if impl == "upstream" else args.limit
        # Repeated (not upstream's: seconds each): one change takes a few milliseconds, on a machine
        # that is not otherwise quiet, so a single sample says little; the row gives the median.
        repeats = 1 if impl == "upstream" else args.changes
        samples: dict[str, list[dict]] = {"add": [], "del": []}

        def one_change(step: str, k: int, gone: int) -> dict:
            before = gauge.count()
            target = (lambda: gauge.count() >= before + per) if step == "add" else (lambda: gauge.count() <= before - per)
            ticks_before = meter.ticks()
            if isinstance(driver, Floor):
                driver.send(f"add {k}" if step == "add" else f"del {gone}")
                res = watch(meter, target, limit=step_limit, quiet=driver.quiet, interval=0.001)
                t_ref, _, client_cpu = driver.reply()
                res.idle_at, res.cpu_s = None, client_cpu
            else:
                if step == "add":
                    _, t_ref = ovsdb.add_tunnels([(f"gnv{k}", LOAD_LOCAL, remote_ip(k, LOAD_REMOTES))])
                else:
                    uuid = ovsdb.port_uuid(f"gnv{gone}")
                    _, t_ref = ovsdb.delete_port(uuid)
                # Both drive pluto with synchronous commands, so a monitor that has gone quiet there
                # without the change showing will not show it (upstream deletes only the connection
                # that has a state line). charon's starter works on after upstream's `ipsec update`.
                res = watch(meter, target, limit=step_limit, quiet=driver.quiet, interval=0.001, start=t_ref,
                            give_up_quiet=STEP_GIVE_UP_QUIET if driver.ike == "libreswan" else None)
            info = {"visible_s": round(res.reached_at - t_ref, 4) if res.reached_at else None,
                    "idle_again_s": round(res.idle_at - t_ref, 4) if res.idle_at else None,
                    "cpu_s": round(res.cpu_s, 4), "cpu_ticks_s": round(meter.ticks() - ticks_before, 3)}
            if res.reached_at is None and res.idle_at is not None:
                changed = abs(gauge.count() - before)
                info["incomplete"] = (f"the monitor was idle again after {info['idle_again_s']} s with {changed} of "
                                      f"{per} {gauge.unit} {'added' if step == 'add' else 'removed'}")
                if gauge.names is not None and step == "del":
                    info["left_behind"] = sorted(name for name in gauge.names if pluto_conn_tunnel(name) == f"gnv{gone}")
            elif res.reached_at is None or (res.idle_at is None and not isinstance(driver, Floor)):
                info["cut_off"] = f"limit {step_limit:g} s"
            log(f"  {impl} N={n} ({driver.ike}): {step} one: visible {info['visible_s']} s, "
                f"idle again {info['idle_again_s']} s, cpu {info['cpu_s']} s"
                + (f"; INCOMPLETE: {info['incomplete']} {info.get('left_behind', '')}" if "incomplete" in info else ""))
            return info

        for k, gone in ((n + 1 + rep, rep + 1) for rep in range(repeats)):
            for step in ("add", "del"):
                info = one_change(step, k, gone)
                samples[step].append(info)
                if "cut_off" in info:
                    detail[step] = info
                    return row, detail
        for step, key in (("add", "add_one_s"), ("del", "del_one_s")):
            # The median sample stands for the step; every sample's visible time is kept.
            ranked = sorted(samples[step], key=lambda info: info["visible_s"] or 0.0)
            detail[step] = {**ranked[len(ranked) // 2], "samples_visible_s": [info["visible_s"] for info in ranked]}
            row[key] = detail[step]["visible_s"]
        detail["verified_after_add_del"] = driver.verify()

        # -- idle ------------------------------------------------------------------------------
        if not isinstance(driver, Floor) and args.idle > 0:
            t0, ns0, ticks0 = time.time(), meter.ns(), meter.ticks()
            daemon0 = cpu_ticks(driver.ike_pid())[0]
            time.sleep(args.idle)
            seconds = time.time() - t0
            # schedstat (ns) rather than stat's 10 ms ticks, so a daemon that wakes briefly shows
            row["idle_cpu_pct"] = round(100 * (meter.ns() - ns0) / 1e9 / seconds, 4)
            detail["idle"] = {"seconds": round(seconds, 2), "cpu_precise_s": round((meter.ns() - ns0) / 1e9, 5),
                              "cpu_ticks_s": round(meter.ticks() - ticks0, 2),
                              f"{daemon}_cpu_s": round(cpu_ticks(driver.ike_pid())[0] - daemon0, 3)}
            log(f"  {impl} N={n} ({driver.ike}): idle {seconds:.0f} s: {detail['idle']}")
        return row, detail
    finally:
        if driver.started():  # at the end of the cell, whichever way it ended
            row["rss_mb"] = round(memory_kb(driver.pid).get("VmHWM", 0) / 1024, 1) or row["rss_mb"]
            detail[f"{daemon}_rss_mb"] = round(memory_kb(driver.ike_pid()).get("VmRSS", 0) / 1024, 1)
            detail[f"{daemon}_cpu_total_s"] = round(cpu_ticks(driver.ike_pid())[0], 3)
            if isinstance(driver, Upstreams) and driver.ike == "strongswan":
                detail["starter_cpu_s"] = round(sum(cpu_ticks(driver.up.starter_pid)), 3)
                detail["starter_rss_mb"] = round(memory_kb(driver.up.starter_pid).get("VmHWM", 0) / 1024, 1)
        driver.stop()


def load_n(n: int, ike: str, impls: list[str], args) -> list[tuple[dict, dict]]:
    """One private host and one ovsdb-server for this N and IKE daemon; a fresh charon or pluto for
    each implementation."""
    out = []
    prefix = "ob" + secrets.token_hex(2)
    folder = WORKDIR / (f"load-{n}" if ike == "strongswan" else f"load-lsw-{n}")
    with Sandbox(prefix, _fresh(folder), keep_files=args.keep) as box:
        host = box.add_host("h", f"{LOAD_LOCAL}/16", extra_charon_conf=CHARON_CONF, ike_daemon=ike)
        # the remotes are on-link; nothing answers (only upstream on pluto sends them anything: its
        # IKE_SA_INITs, which die in ARP inside the namespace)
        ip(host.name, "route", "add", f"{LOAD_REMOTES}.0.0/16", "dev", host.device)
        host.start_ovsdb()
        ovsdb = Ovsdb(f"{host.workdir}/db.sock")
        spd = SpdCounter(host.name)
        try:
            for impl in impls:
                log(f"load N={n} {impl} on {DAEMON[ike]}")
                driver = {"ours": lambda: Ours(host, CHARON_CONF),
                          "upstream": lambda: Upstreams(host, CHARON_CONF),
                          "floor": lambda: Floor(host, CHARON_CONF, LOAD_LOCAL, LOAD_REMOTES)}[impl]()
                try:
                    out.append(load_cell(driver, n, ovsdb, spd, args))
                except Exception as exc:  # one broken cell must not lose the others
                    log(f"  {impl} N={n} ({ike}) FAILED: {exc!r}")
                    out.append((empty_row(n, ike, impl), {"n": n, "ike": ike, "impl": impl, "error": repr(exc)}))
                ovsdb.clear_ports()
                if ike == "strongswan":  # pluto leaves two ND bypass policies; its next cell has a new one
                    _wait_spd_empty(spd)
        finally:
            spd.close()
            ovsdb.close()
    return out


def _fresh(path: Path) -> Path:
    """A work folder with nothing from an earlier run (a kept one would hold an old database)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def _wait_spd_empty(spd: SpdCounter, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while spd.out() and time.time() < deadline:
        time.sleep(0.1)


# -- establishment -----------------------------------------------------------------------------

def establish_cell(impl: str, n: int, args, proposals: str = "modern") -> dict:
    """Time from A's commit until A's charon has N IKE SAs established.

    `proposals` (ours and the floor): "modern", ours' default (curve25519 first, MODP-2048 kept), or
    "modp2048", upstream's (ours through options:ike/esp). Upstream always uses its own."""
    prefix = "oe" + secrets.token_hex(2)
    proposals = "modp2048" if impl == "upstream" else proposals
    extra = (("ipsec_esp", PROPOSALS[proposals][1]), ("ipsec_ike", PROPOSALS[proposals][0])) if impl == "ours" and \
        proposals != "modern" else ()
    detail: dict = {"n": n, "ike": "strongswan", "impl": impl, "proposals": proposals,
                    "loadavg_1min_before": float(Path("/proc/loadavg").read_text().split()[0])}
    limit = args.establish_limit
    with Sandbox(prefix, _fresh(WORKDIR / f"est-{impl}-{n}"), keep_files=args.keep) as box:
        a = box.add_host("a", f"{EST_A}/16", extra_charon_conf=CHARON_CONF)
        b = box.add_host("b", f"{est_b_ip(1)}/16", extra_charon_conf=CHARON_CONF)
        ip(b.name, "-batch", "-", batch="".join(f"addr add {est_b_ip(i)}/16 dev {b.device}\n"
                                                 for i in range(2, n + 1)))
        da, db = (_est_driver(impl, h, proposals) for h in (a, b))
        system0 = None
        try:
            for host, driver in ((b, db), (a, da)):
                host.start_ovsdb()
                driver.start()
            # B (the responders) first, loaded and quiet.
            if isinstance(db, Floor):
                db.send(f"respond 1 {n} {EST_A}")
                t_b = db.reply()[0]
            else:
                ob = Ovsdb(f"{b.workdir}/db.sock")
                _, t_b = ob.add_tunnels([(f"gnv{i}", est_b_ip(i), EST_A) for i in range(1, n + 1)], extra)
            # Counted in charon, not in the SPD: upstream ignores local_ip (left=%any), so B's N traps
            # toward A's one address are identical policies that the kernel holds once.
            res = watch(db.meter(), _every(0.25, lambda: charon_children(db.vici_path, db.prefix)[1] >= 2 * n),
                        limit=limit, quiet=db.quiet, interval=0.01, start=t_b)
            if res.reached_at is None:
                detail["cut_off"] = f"B not loaded after {limit:g} s"
                return detail
            detail["b_loaded_s"] = round(res.reached_at - t_b, 3)
            wait_quiet(da.meter(), quiet=1.0, limit=60)

            spd_a = SpdCounter(a.name)
            session = vici_session(da.vici_path)
            # Where the window's CPU goes: both charons and both monitors (floor: its script), and
            # for ours the reconcile passes (metrics), read before the commit and at the finish.
            procs = {"a_charon": a.charon_pid, "b_charon": b.charon_pid, "a_driver": da.pid, "b_driver": db.pid,
                     "a_ovsdb": int((a.workdir / "ovsdb-server.pid").read_text()),
                     "b_ovsdb": int((b.workdir / "ovsdb-server.pid").read_text())}
            passes0 = _passes(da, db)
            spies = _spies(da, db, args.est_spy, f"{impl}-{n}") if args.est_spy else []
            cpu0 = {name: cpu_ns(pid) for name, pid in procs.items()}
            system0 = system_jiffies()
            if isinstance(da, Floor):  # from its first VICI call; it answers `done` once all are sent
                da.send(f"initiate 1 {n}")
                t_ref = float(da.proc.stdout.readline().split()[1])
            else:
                oa = Ovsdb(f"{a.workdir}/db.sock")
                _, t_ref = oa.add_tunnels([(f"gnv{i}", EST_A, est_b_ip(i)) for i in range(1, n + 1)], extra)
            loaded_at = triggered_at = reached = None
            deadline = t_ref + limit
            while time.time() < deadline:
                now = time.time()
                if loaded_at is None and spd_a.out() >= 2 * n:
                    loaded_at = now
                    if impl == "upstream":  # auto=route: only traffic starts IKE
                        triggered_at = time.time()
                        trigger(a.name, [est_b_ip(i) for i in range(1, n + 1)])
                total, half_open = ike_sa_counts(session)
                if total - half_open >= n:
                    reached = time.time()
                    break
                time.sleep(0.02)
            detail["a_loaded_s"] = round(loaded_at - t_ref, 3) if loaded_at else None
            if triggered_at:
                detail["triggered_at_s"] = round(triggered_at - t_ref, 3)
            if reached is None:
                total, half_open = ike_sa_counts(session)
                detail["cut_off"] = f"{total - half_open} of {n} IKE SAs up after {limit:g} s"
                log(f"  establish {impl} N={n}: CUT OFF {detail['cut_off']}")
                return detail
            detail["establish_s"] = round(reached - t_ref, 3)
            detail["window_cpu_s"] = {name: round((cpu_ns(pid) - cpu0[name]) / 1e9, 3) for name, pid in procs.items()}
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            passes1 = _passes(da, db)
            if passes0 and passes1:
                detail["reconcile"] = {side: {key: round(passes1[side][key] - passes0[side][key], 3)
                                              for key in passes1[side]} for side in passes1}
            if isinstance(da, Floor):
                _, sent_at, _ = da.proc.stdout.readline().split()
                detail["floor_all_sent_s"] = round(float(sent_at) - t_ref, 3)
            if triggered_at:
                detail["after_trigger_s"] = round(reached - triggered_at, 3)
            detail["verified_established"] = established_sas(da.vici_path)
            log(f"  establish {impl} N={n}: {detail['establish_s']} s")
            return detail
        finally:
            system1 = system_jiffies()
            if system0 is not None:
                detail["machine_busy_pct"] = round(100 * (system1[0] - system0[0]) / max(1, system1[1] - system0[1]), 1)
            log_path = (da.up.dir if isinstance(da, Upstreams) else a.workdir) / "charon.log"
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            detail["udp_rcvbuf_errors"] = {"a": _udp_rcvbuf_errors(a.name), "b": _udp_rcvbuf_errors(b.name)}
            detail["a_charon_log"] = {"acquires": text.count("creating acquire job"),
                                      "vici_initiates": text.count("vici initiate"),
                                      "child_sa_attempts": text.count("establishing CHILD_SA"),
                                      "retransmits": text.count("retransmit ")}
            if impl != "upstream":
                text = (b.workdir / "charon.log").read_text(errors="replace")
                detail["b_charon_log"] = {"ike_sa_init_requests": text.count("parsed IKE_SA_INIT request"),
                                          "create_child_sa_requests": text.count("parsed CREATE_CHILD_SA request"),
                                          "vici_initiates": text.count("vici initiate")}
            for driver in (da, db):
                try:
                    driver.stop()
                except Exception as exc:
                    log(f"  stopping {driver.impl} on {driver.host.name}: {exc!r}")


def _udp_rcvbuf_errors(netns: str) -> int | None:
    """UDP datagrams the namespace's kernel dropped for a full socket buffer (IKE packets lost to
    a burst: charon retransmits them after 4 s)."""
    try:
        text = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/snmp"], capture_output=True,
                              text=True, timeout=10).stdout
        header, values = [line.split() for line in text.splitlines() if line.startswith("Udp:")][:2]
        return int(values[header.index("RcvbufErrors")])
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _passes(*drivers: Driver) -> dict | None:
    """Ours: each monitor's reconcile passes and their seconds so far (its metrics), per side."""
    if not all(isinstance(d, Ours) for d in drivers):
        return None
    found = {}
    for side, driver in zip("ab", drivers, strict=True):
        text = driver.host.appctl("metrics/show")
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("ovs_ipsec_reconcile_"))
        found[side] = {"passes": float(values.get("ovs_ipsec_reconcile_duration_seconds_count", "nan")),
                       "pass_s": float(values.get("ovs_ipsec_reconcile_duration_seconds_sum", "nan"))}
    return found


def _spies(da: Driver, db: Driver, folder: str, stem: str) -> list[subprocess.Popen]:
    """--est-spy: py-spy (200 samples/s, every thread) on A's and B's monitor for the window."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(driver.pid),
                               "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
                               "--output", f"{folder}/{stem}-{side}.txt"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for side, driver in (("a", da), ("b", db))]
    time.sleep(1.0)  # py-spy attaches
    return spies


def _est_driver(impl: str, host, proposals: str) -> Driver:
    if impl == "floor":  # straight into charon over VICI; the local address is A's (B's are per tunnel)
        return Floor(host, CHARON_CONF, EST_A, LOAD_REMOTES, proposals)
    return Ours(host, CHARON_CONF) if impl == "ours" else Upstreams(host, CHARON_CONF)


def _every(seconds: float, predicate):
    """predicate(), asked at most once per `seconds` (False in between)."""
    last = [0.0]

    def throttled() -> bool:
        if time.time() - last[0] < seconds:
            return False
        last[0] = time.time()
        return predicate()
    return throttled


# -- the run -----------------------------------------------------------------------------------

def machine() -> dict:
    def first_line(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
        except Exception:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    dpkg = {p: first_line(["dpkg-query", "-W", "-f=${Version}", p])
            for p in ("openvswitch-ipsec", "charon-systemd", "strongswan-starter")}
    # extracted, not installed (it conflicts with strongSwan): its .deb is next to the root
    deb = next(Path(LIBRESWAN_ROOT).parent.glob("libreswan_*.deb"), None)
    dpkg["libreswan (extracted)"] = first_line(["dpkg-deb", "-f", str(deb), "Version"]) if deb else None
    git = {"commit": first_line(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"]),
           "uncommitted_files_in_src": len(subprocess.run(
               ["git", "-C", str(HERE.parent), "status", "--porcelain", "src"], capture_output=True,
               text=True).stdout.splitlines())}
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1), "ours_tree": git,
            "kernel": platform.release(), "python": platform.python_version(), "packages": dpkg,
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="10,100,1000,5000", help="tunnel counts for the load test (strongSwan)")
    parser.add_argument("--est-proposals", default="modern",
                        help="establishment proposals for ours and the floor: modern (ours' default: curve25519 "
                             "first, MODP-2048 kept) and/or modp2048 (upstream's)")
    parser.add_argument("--establish", default="100,1000",
                        help="tunnel counts for establishment, strongSwan only ('' to skip)")
    parser.add_argument("--lsw-n", default="100,1000", help="tunnel counts for the load test on LibreSwan")
    parser.add_argument("--ike", default=",".join(IKES), help="IKE daemons to run: strongswan, libreswan or both")
    parser.add_argument("--impl", default=",".join(IMPLS), help="implementations (the floor is strongSwan only)")
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds (the issue's 60 s, shortened)")
    parser.add_argument("--changes", type=int, default=7,
                        help="one-tunnel +1/-1 pairs per cell for ours and the floor (the median is reported)")
    parser.add_argument("--limit", type=float, default=120.0, help="time limit for ours and the floor, s")
    parser.add_argument("--upstream-limit", type=float, default=150.0, help="time limit for upstream's load, s")
    parser.add_argument("--upstream-step-limit", type=float, default=60.0,
                        help="time limit for upstream's +1 and -1 steps (visible, then idle again), s")
    parser.add_argument("--establish-limit", type=float, default=120.0)
    parser.add_argument("--est-spy", default="",
                        help="establishment: py-spy both monitors through the window, raw stacks into this folder")
    parser.add_argument("--ours-flags", default="", help="extra monitor flags for ours, space-separated "
                        "(experiments, e.g. '-vsyslog:off')")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--keep", action="store_true", help="keep the sandboxes' logs under /tmp/oib")
    parser.add_argument("--only", choices=("scale", "userspace-esp", "mesh"),
                        help="run one section: the monitor's scale matrix, userspace ESP throughput, or the "
                             "full mesh (default: the first two, userspace ESP last; the mesh only when asked)")
    parser.add_argument("--mesh-hosts", default="20", help="full mesh: host counts (H hosts, H(H-1) tunnels)")
    parser.add_argument("--mesh-limit", type=float, default=300.0,
                        help="full mesh: cut-off for the establishment and for the repair, s")
    parser.add_argument("--mesh-settle", type=float, default=None,
                        help="full mesh: seconds between the established mesh and the charon kill (default: 35 "
                             "for ours, 170 for upstream: its trigger's ACQUIREs leave larval states in the kernel "
                             "that outlive charon for 165 s and hide the next packets)")
    parser.add_argument("--mesh-kill", type=int, default=0,
                        help="full mesh: the host (from 1) whose charon is killed (0: the middle one)")
    parser.add_argument("--esp-seconds", type=float, default=5.0, help="userspace ESP: seconds per cell")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 1
    if args.only == "userspace-esp":
        return userspace_esp_section(args)
    if args.only == "mesh":
        return mesh_section(args)
    impls = [i for i in args.impl.split(",") if i]
    ikes = [i for i in args.ike.split(",") if i]
    if set(ikes) - set(IKES):
        parser.error(f"--ike: one or more of {', '.join(IKES)}")
    if "libreswan" in ikes and not os.access(f"{LIBRESWAN_ROOT}/usr/libexec/ipsec/pluto", os.X_OK):
        parser.error(f"no pluto in {LIBRESWAN_ROOT}: run scripts/setup-libreswan.sh (make setup does)")
    Ours.extra_flags = tuple(args.ours_flags.split())
    ns = [int(x) for x in args.n.split(",") if x] if "strongswan" in ikes else []
    est = [int(x) for x in args.establish.split(",") if x] if "strongswan" in ikes else []
    est_proposals = [p for p in args.est_proposals.split(",") if p]
    lsw_ns = [int(x) for x in args.lsw_n.split(",") if x] if "libreswan" in ikes else []
    lsw_impls = [i for i in impls if i != "floor"]  # the floor is a VICI script: strongSwan only
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: dict[tuple[str, int, str], dict] = {}
    details: list[dict] = []
    result = {"machine": machine(), "settings": {
        "idle_window_s": args.idle, "limit_s": args.limit, "upstream_limit_s": args.upstream_limit,
        "upstream_step_limit_s": args.upstream_step_limit,
        "establish_limit_s": args.establish_limit, "charon_conf": CHARON_CONF, "ours_flags": args.ours_flags,
        "ike": ikes, "n": ns, "lsw_n": lsw_ns}, "runs": [], "details": details}

    def save() -> None:
        order = sorted(rows, key=lambda k: (IKES.index(k[0]), k[1], IMPLS.index(k[2])))
        result["runs"] = [rows[key] for key in order]
        result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        result["duration_s"] = round(time.time() - started, 1)
        (out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")

    for n in ns:
        for row, detail in load_n(n, "strongswan", impls, args):
            rows[("strongswan", n, row["impl"])] = row
            details.append(detail)
        save()
    for n in est:
        for impl in impls:
            # the table's row has ours' default; the other proposal is in the details
            for proposals in (est_proposals if impl != "upstream" else ["modp2048"]):
                log(f"establish N={n} {impl} ({proposals})")
                try:
                    detail = establish_cell(impl, n, args, proposals)
                except Exception as exc:
                    log(f"  establish {impl} N={n} FAILED: {exc!r}")
                    detail = {"n": n, "ike": "strongswan", "impl": impl, "proposals": proposals, "error": repr(exc)}
                detail["kind"] = "establish"
                details.append(detail)
                row = rows.setdefault(("strongswan", n, impl), empty_row(n, "strongswan", impl))
                if proposals == "modern" or impl == "upstream":
                    row["establish_s"] = detail.get("establish_s")
                save()
    # LibreSwan last, so the strongSwan figures are taken exactly as before. No establishment:
    # see bench/README.md.
    for n in lsw_ns:
        for row, detail in load_n(n, "libreswan", lsw_impls, args):
            rows[("libreswan", n, row["impl"])] = row
            details.append(detail)
        save()
    save()
    log(f"done in {time.time() - started:.0f} s")
    import report

    report.write(out / "latest.json", out)
    if args.only is None:
        return userspace_esp_section(args)
    return 0


def mesh_section(args: argparse.Namespace) -> int:
    """The full mesh (bench/mesh.py), ours and upstream on strongSwan, in results/mesh.{json,md}."""
    import mesh

    Ours.extra_flags = tuple(args.ours_flags.split())
    impls = [i for i in args.impl.split(",") if i in ("ours", "upstream")]  # no floor: it has no OVSDB
    drivers = {"ours": Ours, "upstream": Upstreams}
    mesh.run_section([int(x) for x in args.mesh_hosts.split(",") if x], impls,
                     lambda impl, host: drivers[impl](host, CHARON_CONF), CHARON_CONF, WORKDIR, Path(args.out),
                     machine(), args)
    return 0


def userspace_esp_section(args: argparse.Namespace) -> int:
    """Userspace ESP against plain forwarding through the same bump (bench/userspace_esp.py), in
    results/userspace_esp.{json,md}, so running it alone leaves the scale figures untouched."""
    import userspace_esp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log("userspace ESP throughput")
    result = {"machine": machine(), **userspace_esp.run(args.esp_seconds, WORKDIR / "userspace-esp")}
    (out / "userspace_esp.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "userspace_esp.md").write_text(userspace_esp.table(result))
    print(userspace_esp.table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
