"""Full mesh (`run.py --only mesh`): H hosts on one switch, each with its own ovsdb-server, charon
and monitor, and one Geneve PSK tunnel from every host to every other (H * (H - 1) tunnels,
local_ip and remote_ip set), ours against Debian's ovs-monitor-ipsec (each host runs the same one).

Two figures per implementation (bench/README.md, "Full mesh"):

* establish: from the first host's commit (the hosts commit one after the other, one transaction
  each) until every host's charon lists an ESTABLISHED IKE SA to every other host (VICI list-sas
  on every charon, by remote address; this kernel has no ESP, so no CHILD_SA can be installed and
  the IKE SA is what counts). Upstream (auto=route) initiates only on traffic: once every host
  holds its trap policies, one UDP packet per tunnel to its remote Geneve port, paced as in the
  establishment cell; the time after that trigger is given too.
* repair: one host's charon is killed (SIGKILL, a crash). For ours the harness starts
  charon-systemd again at once, as systemd's Restart= would; upstream's starter restarts its
  charon by itself. From the kill until the mesh is whole again: every host lists an IKE SA to
  every other, and every SA between the killed host and a peer is younger than the kill (a peer's
  SA with the dead charon is stale, however ESTABLISHED it says it is). For upstream the tunnels to
  and from the killed host are triggered again once its charon has its connections back.

Results: bench/results/mesh.{json,md} and mesh.png.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    Ovsdb, SpdCounter, charon_children, log, memory_kb, system_jiffies, text, trigger, vici_session, wait_quiet,
)

from testsupport.procs import wait_for, wait_gone
from testsupport.sandbox import Host, Sandbox

MESH_NET = "10.230.0"  # host i (from 1) is 10.230.0.i: ours initiates toward every higher address
POLL_INTERVAL = 0.1  # between two rounds of list-sas over every charon


# Between the established mesh and the kill. Ours: long enough for its retries to back off (so the
# restart meets a grown backoff, as in a real outage). Upstream: longer than the larval (ACQUIRE)
# states its trigger left in every kernel live (165 s here, logged by charon as "creating delete job
# for CHILD_SA ESP/0x00000000" when they go): they survive a charon crash, and while one is there a
# packet to its tunnel makes no new ACQUIRE, so the restarted charon would wait for them, not for
# anything upstream does (measured at 4 hosts with 35 s: the repair took 136 s, 131 s after the
# trigger, all of it waiting for them).
SETTLE = {"ours": 35.0, "upstream": 170.0}


def settle_s(impl: str, override: float | None) -> float:
    return SETTLE[impl] if override is None else override


def mesh_ip(index: int) -> str:
    return f"{MESH_NET}.{index}"


def mesh_tunnels(index: int, hosts: int) -> list[tuple[str, str, str]]:
    """(name, local_ip, remote_ip) of host `index`'s tunnels: one to each other host."""
    return [(f"gnv{peer}", mesh_ip(index), mesh_ip(peer)) for peer in range(1, hosts + 1) if peer != index]


def ike_peers(session) -> dict[str, float]:
    """{remote address: age in seconds of its youngest ESTABLISHED IKE SA} from list-sas. Upstream
    may hold two SAs per peer (both ends triggered, an in and an out connection); one is enough.
    A blocking listing: with noblock, charon skips every SA a worker holds at that moment."""
    peers: dict[str, float] = {}
    for event in session.list_sas():
        for details in event.values():
            if text(details.get("state", b"")) != "ESTABLISHED":
                continue
            remote, age = text(details.get("remote-host", b"")), float(text(details.get("established", b"0")))
            peers[remote] = min(age, peers.get(remote, age))
    return peers


class Probe:
    """One host's charon, asked over VICI; a dead or restarting charon lists nothing."""

    def __init__(self, vici_path: str) -> None:
        self.vici_path = vici_path
        self._session = None

    def peers(self) -> dict[str, float]:
        try:
            if self._session is None:
                self._session = vici_session(self.vici_path, timeout=10)
            return ike_peers(self._session)
        except Exception:  # charon gone, restarting, or the socket broke: ask again next round
            self._session = None
            return {}


@dataclass(frozen=True)
class MeshState:
    """How far the mesh is: tunnels (host, peer) whose host lists a usable IKE SA to its peer."""

    up: int
    total: int
    missing: tuple[tuple[int, int], ...]


def mesh_state(peers: list[dict[str, float]], fresh_for: int | None = None, since: float | None = None) -> MeshState:
    """peers[i - 1] is host i's ike_peers(). With fresh_for (a host index) and since (seconds ago),
    an SA between that host and a peer counts only when it is younger than `since`. charon gives
    an SA's age in whole seconds of its own clock, so one made 0.3 s ago may say 1: a second of slack
    (an SA from before the kill is older than the settle period, 35 s or more)."""
    hosts = len(peers)
    missing = []
    for index in range(1, hosts + 1):
        for peer in range(1, hosts + 1):
            if peer == index:
                continue
            age = peers[index - 1].get(mesh_ip(peer))
            stale = fresh_for in (index, peer) and age is not None and since is not None and age > since + 1
            if age is None or stale:
                missing.append((index, peer))
    total = hosts * (hosts - 1)
    return MeshState(total - len(missing), total, tuple(missing))


@dataclass
class Progress:
    """(seconds from the reference, tunnels up) whenever the count changes: the curve of the plot."""

    start: float
    points: list[tuple[float, int]] = field(default_factory=list)

    def add(self, now: float, up: int) -> None:
        if not self.points or self.points[-1][1] != up:
            self.points.append((round(now - self.start, 3), up))


class Triggers:
    """Triggers run in a thread, so the measuring loop keeps polling while packets go out.

    After the first round, the tunnels still missing get another packet every RETRIGGER seconds,
    as a hypervisor's continuous Geneve traffic would give them: a packet that hits a trap while
    the kernel still holds the larval state of an earlier ACQUIRE for it (net.core.xfrm_acq_expires,
    30 s) makes no new ACQUIRE, and an ACQUIRE charon lost or failed is never repeated by itself."""

    RETRIGGER = 10.0

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.rounds = 0
        self.packets = 0
        self.last = 0.0

    def start(self, pairs: list[tuple[int, int]]) -> None:
        """One packet per (host, peer) tunnel, host by host."""
        by_host: dict[int, list[str]] = {}
        for index, peer in pairs:
            by_host.setdefault(index, []).append(mesh_ip(peer))
        jobs = [(self.hosts[index - 1].name, addresses) for index, addresses in sorted(by_host.items())]
        self.rounds += 1
        self.packets += len(pairs)
        self.last = time.time()

        def send() -> None:
            for netns, addresses in jobs:
                try:
                    trigger(netns, addresses)
                except Exception as exc:  # reported, the measurement goes on
                    self.errors.append(f"{netns}: {exc!r}")
        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        self.threads.append(thread)

    def again(self, missing: tuple[tuple[int, int], ...]) -> None:
        """The missing tunnels once more, when the last round is done and RETRIGGER has passed."""
        if missing and time.time() - self.last >= self.RETRIGGER and not any(t.is_alive() for t in self.threads):
            self.start(list(missing))

    def report(self) -> dict:
        return {"rounds": self.rounds, "packets": self.packets, "errors": self.errors[:5]}

    def join(self) -> None:
        for thread in self.threads:
            thread.join(70)


# -- the cell ------------------------------------------------------------------------------------

def mesh_cell(impl: str, hosts_n: int, make_driver: Callable, charon_conf: str, workdir: Path, args) -> dict:
    """Establish the mesh, then kill one charon and time the repair. make_driver(impl, host) is
    run.py's Ours or Upstreams for the host."""
    prefix = "om" + secrets.token_hex(2)
    total = hosts_n * (hosts_n - 1)
    detail: dict = {"kind": "mesh", "impl": impl, "hosts": hosts_n, "tunnels": total, "ike": "strongswan", "prefix": prefix,
                    "loadavg_1min_before": float(Path("/proc/loadavg").read_text().split()[0])}
    shutil.rmtree(workdir, ignore_errors=True)
    with Sandbox(prefix, workdir, keep_files=args.keep) as box:
        hosts: list[Host] = [box.add_host(f"h{i}", f"{mesh_ip(i)}/24", extra_charon_conf=charon_conf)
                             for i in range(1, hosts_n + 1)]
        drivers: list = []
        spds: list[SpdCounter] = []
        triggers = Triggers(hosts)
        try:
            started = time.time()
            for host in hosts:
                host.start_ovsdb()
                driver = make_driver(impl, host)
                drivers.append(driver)
                driver.start()
            for driver in drivers:
                wait_quiet(driver.meter(), quiet=driver.quiet, limit=60)
            detail["start_up_s"] = round(time.time() - started, 1)
            spds = [SpdCounter(host.name) for host in hosts]
            probes = [Probe(driver.vici_path) for driver in drivers]
            detail["establish"] = _establish(impl, hosts, spds, probes, triggers, args.mesh_limit)
            log(f"  mesh {impl} H={hosts_n}: {detail['establish']['summary']}")
            if detail["establish"].get("established_s") is not None:
                settle = settle_s(impl, args.mesh_settle)
                detail["settle_s"] = settle
                time.sleep(settle)
                detail["repair"] = _repair(impl, hosts, drivers, probes, triggers, args)
                log(f"  mesh {impl} H={hosts_n} repair: {detail['repair']['summary']}")
            detail["rss_mb"] = _rss(drivers)
            return detail
        finally:
            triggers.join()
            for spd in spds:
                spd.close()
            detail["log_counts"] = _log_counts(impl, drivers)
            for driver in drivers:
                try:
                    driver.stop()
                except Exception as exc:
                    log(f"  stopping {impl} on {driver.host.name}: {exc!r}")


def _establish(impl: str, hosts: list[Host], spds: list[SpdCounter], probes: list[Probe], triggers: Triggers,
               limit: float) -> dict:
    n = len(hosts)
    out: dict = {}
    ovsdbs = [_ovsdb(host) for host in hosts]
    system0 = system_jiffies()
    commits = []
    for index, ovsdb in enumerate(ovsdbs, start=1):
        _, committed = ovsdb.add_tunnels(mesh_tunnels(index, n))
        commits.append(committed)
    for ovsdb in ovsdbs:
        ovsdb.close()
    t_ref = commits[0]
    out["last_commit_s"] = round(commits[-1] - t_ref, 3)
    progress = Progress(t_ref)
    loaded_at = triggered_at = reached = None
    state = MeshState(0, n * (n - 1), ())
    while time.time() < t_ref + limit:
        now = time.time()
        # Loaded: every host holds the trap policies of its 2 (H - 1) children (one OUT policy each).
        if loaded_at is None and all(spd.out() >= 2 * (n - 1) for spd in spds):
            loaded_at = now
            if impl == "upstream":  # auto=route: only traffic starts IKE
                triggered_at = time.time()
                triggers.start([(i, p) for i in range(1, n + 1) for p in range(1, n + 1) if p != i])
        state = mesh_state([probe.peers() for probe in probes])
        if triggered_at:
            triggers.again(state.missing)
        progress.add(time.time(), state.up)
        if state.up == state.total:
            reached = time.time()
            break
        time.sleep(POLL_INTERVAL)
    system1 = system_jiffies()
    out["machine_busy_pct"] = round(100 * (system1[0] - system0[0]) / max(1, system1[1] - system0[1]), 1)
    out["loaded_s"] = round(loaded_at - t_ref, 3) if loaded_at else None
    out["progress"] = progress.points
    if triggered_at:
        out["triggered_at_s"] = round(triggered_at - t_ref, 3)
        out["trigger"] = triggers.report()
    if reached is None:
        out["established_s"] = None
        out["cut_off"] = f"{state.up} of {state.total} tunnels up after {limit:g} s"
        out["missing_sample"] = state.missing[:20]
        out["summary"] = f"CUT OFF: {out['cut_off']}"
        return out
    out["established_s"] = round(reached - t_ref, 3)
    if triggered_at:
        out["after_trigger_s"] = round(reached - triggered_at, 3)
    out["ike_sas_per_host"] = [_sa_count(probe) for probe in probes]
    out["summary"] = (f"{state.total} tunnels up {out['established_s']} s after the first commit"
                      + (f" ({out['after_trigger_s']} s after the trigger)" if triggered_at else ""))
    return out


def _repair(impl: str, hosts: list[Host], drivers: list, probes: list[Probe], triggers: Triggers, args) -> dict:
    n = len(hosts)
    victim = args.mesh_kill or (n + 1) // 2  # the middle host: initiator toward higher, responder to lower
    host, driver = hosts[victim - 1], drivers[victim - 1]
    triggers.rounds = triggers.packets = 0  # count this phase's own
    out: dict = {"killed_host": victim, "killed_address": mesh_ip(victim),
                 "restarted_by": "the harness, at once (as systemd Restart=)" if impl == "ours"
                 else "upstream's starter (ipsec restart's daemon)"}
    old_pid = driver.ike_pid()
    t_kill = time.time()
    os.kill(old_pid, signal.SIGKILL)
    wait_gone(old_pid, 10)
    if impl == "ours":
        host.charon.pid = None
        host.charon.stop()  # forget the pid, remove the stale socket
        host.start_charon()
    else:
        # starter notices its charon died and starts it again; the new pid is on the monitor's /run
        new_pid = wait_for(lambda: _new_pid(driver, old_pid), args.mesh_limit, interval=0.05,
                           what="upstream's starter to restart charon")
        driver.up.charon_pid = new_pid
    wait_for(lambda: _answers(driver.vici_path), 60, interval=0.02, what="the new charon over VICI")
    out["charon_back_s"] = round(time.time() - t_kill, 3)
    progress = Progress(t_kill)
    # At the kill, by the count's definition: the killed host lists nothing, and its peers' SAs
    # with it are all older than the kill (the loop only starts once charon answers again).
    progress.points.append((0.0, n * (n - 1) - 2 * (n - 1)))
    listed_at = triggered_at = reached = loose_at = None
    state = MeshState(0, n * (n - 1), ())
    limit = args.mesh_limit
    while time.time() < t_kill + limit:
        if listed_at is None:
            try:
                _, children = charon_children(driver.vici_path, driver.prefix)
            except Exception:  # charon busy or restarting: ask again next round
                children = 0
            if children >= 2 * (n - 1):
                listed_at = time.time()
                if impl == "upstream":  # the killed host's tunnels, from both ends
                    triggered_at = time.time()
                    triggers.start([(i, p) for i in range(1, n + 1) for p in range(1, n + 1)
                                    if victim in (i, p) and i != p])
        peers = [probe.peers() for probe in probes]
        if loose_at is None and mesh_state(peers).up == n * (n - 1):
            loose_at = time.time()
        state = mesh_state(peers, fresh_for=victim, since=time.time() - t_kill)
        if triggered_at:
            triggers.again(state.missing)
        progress.add(time.time(), state.up)
        if state.up == state.total:
            reached = time.time()
            break
        time.sleep(POLL_INTERVAL)
    out["connections_back_s"] = round(listed_at - t_kill, 3) if listed_at else None
    out["every_host_lists_an_sa_s"] = round(loose_at - t_kill, 3) if loose_at else None
    out["progress"] = progress.points
    if triggered_at:
        out["triggered_at_s"] = round(triggered_at - t_kill, 3)
        out["trigger"] = triggers.report()
    if reached is None:
        out["repaired_s"] = None
        out["cut_off"] = f"{state.up} of {state.total} tunnels up (fresh) after {limit:g} s"
        out["missing_sample"] = state.missing[:40]
        out["summary"] = f"CUT OFF: {out['cut_off']}"
        return out
    out["repaired_s"] = round(reached - t_kill, 3)
    if triggered_at:
        out["after_trigger_s"] = round(reached - triggered_at, 3)
    out["summary"] = (f"repaired {out['repaired_s']} s after the kill (charon back {out['charon_back_s']} s)"
                      + (f", {out['after_trigger_s']} s after the trigger" if triggered_at else ""))
    return out


def _answers(vici_path: str) -> bool:
    """The charon behind the socket answers a command (a socket that only accepts is not enough)."""
    try:
        vici_session(vici_path, timeout=5).version()
        return True
    except Exception:
        return False


def _new_pid(driver, old_pid: int) -> int | None:
    try:
        pid = int(Path(f"/proc/{driver.pid}/root/run/charon.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid != old_pid and os.path.exists(f"/proc/{pid}") else None


def _ovsdb(host: Host) -> Ovsdb:
    return Ovsdb(f"{host.workdir}/db.sock")


def _sa_count(probe: Probe) -> int:
    try:
        return sum(1 for event in vici_session(probe.vici_path, 10).list_sas()
                   for details in event.values() if text(details.get("state", b"")) == "ESTABLISHED")
    except Exception:
        return -1


def _rss(drivers: list) -> dict:
    """Peak RSS (VmHWM) of the monitors, MB: the largest and the sum over the hosts."""
    peaks = [memory_kb(d.pid).get("VmHWM", 0) / 1024 for d in drivers if d.pid]
    return {"monitor_max": round(max(peaks), 1), "monitors_sum": round(sum(peaks), 1)} if peaks else {}


def _log_counts(impl: str, drivers: list) -> dict:
    """From every charon's log: IKE_SA_INITs sent, retransmits, deleted SAs (the cost of the churn)."""
    counts = {"initiating_ike_sa": 0, "retransmits": 0, "child_sa_attempts": 0, "acquires": 0}
    for driver in drivers:
        path = (driver.up.dir if impl == "upstream" else driver.host.workdir) / "charon.log"
        body = path.read_text(errors="replace") if path.exists() else ""
        counts["initiating_ike_sa"] += body.count("initiating IKE_SA")
        counts["retransmits"] += body.count("retransmit ")
        counts["child_sa_attempts"] += body.count("establishing CHILD_SA")
        counts["acquires"] += body.count("creating acquire job")
    return counts


# -- the section, its JSON and its table ---------------------------------------------------------

def run_section(hosts_list: list[int], impls: list[str], make_driver: Callable, charon_conf: str, workdir: Path,
                out: Path, machine: dict, args) -> dict:
    result: dict = {"machine": machine, "settings": {"limit_s": args.mesh_limit, "settle_s": {impl: settle_s(impl, args.mesh_settle) for impl in impls},
                                                     "charon_conf": charon_conf, "poll_interval_s": POLL_INTERVAL},
                    "cells": []}
    out.mkdir(parents=True, exist_ok=True)
    for hosts_n in hosts_list:
        for impl in impls:
            log(f"mesh H={hosts_n} ({hosts_n * (hosts_n - 1)} tunnels) {impl}")
            try:
                cell = mesh_cell(impl, hosts_n, make_driver, charon_conf, workdir / f"mesh-{impl}-{hosts_n}", args)
            except Exception as exc:  # one broken cell must not lose the others
                log(f"  mesh {impl} H={hosts_n} FAILED: {exc!r}")
                cell = {"kind": "mesh", "impl": impl, "hosts": hosts_n, "error": repr(exc)}
            result["cells"].append(cell)
            (out / "mesh.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "mesh.md").write_text(table(result) + "\n")
    plot(result, out / "mesh.png")
    print(table(result))
    return result


def plot(result: dict, path: Path) -> None:
    """Tunnels up against time, establishment and repair side by side, one line per cell (needs
    matplotlib, as report.py's plot; without it the JSON and the table are still written)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, phase, title in ((axes[0], "establish", "from the first commit"),
                               (axes[1], "repair", "after one host's charon is killed")):
        for cell in result["cells"]:
            points = cell.get(phase, {}).get("progress")
            if not points:
                continue
            xs, ys = zip(*points)
            before = cell["tunnels"] if phase == "repair" else 0  # the whole mesh until the kill
            axis.step((0.0, *xs), (before, *ys), where="post",
                      label=f"{cell['impl']}, {cell['hosts']} hosts")
        axis.set_title(f"Full mesh: {title}")
        axis.set_xlabel("seconds")
        axis.set_ylabel("tunnels with an IKE SA")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _s(value) -> str:
    return "–" if value is None else f"{value:.1f} s" if value >= 10 else f"{value:.2f} s"


def table(result: dict) -> str:
    lines = ["| hosts | tunnels | implementation | established (from the first commit) | after the trigger "
             "| repair after one charon killed | restarted by | charon back | peak RSS per monitor (MB) |",
             "|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for cell in result["cells"]:
        est, rep = cell.get("establish", {}), cell.get("repair", {})
        if "error" in cell:
            lines.append(f"| {cell['hosts']} | – | {cell['impl']} | failed: {cell['error'][:60]} | | | | | |")
            continue
        established = _s(est.get("established_s")) if est.get("established_s") is not None \
            else f"cut off ({est.get('cut_off', '?')})"
        repaired = _s(rep.get("repaired_s")) if rep.get("repaired_s") is not None \
            else (f"cut off ({rep['cut_off']})" if "cut_off" in rep else "–")
        if rep.get("after_trigger_s") is not None:
            repaired += f" ({_s(rep['after_trigger_s'])} after the trigger)"
        lines.append(f"| {cell['hosts']} | {cell['tunnels']} | {cell['impl']} | {established} "
                     f"| {_s(est.get('after_trigger_s')) if 'after_trigger_s' in est else '–'} | {repaired} "
                     f"| {rep.get('restarted_by', '–')} | {_s(rep.get('charon_back_s'))} "
                     f"| {cell.get('rss_mb', {}).get('monitor_max', '–')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """python bench/mesh.py [results/mesh.json]: render mesh.md and mesh.png again from the JSON."""
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "results" / "mesh.json"
    result = json.loads(path.read_text())
    (path.parent / "mesh.md").write_text(table(result) + "\n")
    plot(result, path.parent / "mesh.png")
    print(table(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main(sys.argv))
