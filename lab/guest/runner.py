"""The lab's scenario runner: runs inside the VM (Debian's python3) as a child of init.sh.

For each scenario of scenarios.toml (or the subset named by lab_only= on the kernel command
line) it builds two hosts, lets our monitor encrypt the OVS tunnel between them, proves it with
ping and an underlay capture, prints one `LAB-RESULT {json}` line on the console and keeps the
scenario's logs in /results/<name>/ (lab/results/<name>/ on the host). Then it tears everything
down, so the next scenario starts from a clean kernel.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The overlay's root, /opt/ovs-ipsec: the project's testsupport package (one charon template).
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import golden                                              # noqa: E402
import guard                                               # noqa: E402
import lastgood                                            # noqa: E402
import ovn                                                 # noqa: E402
import scenario as scenarios                                # noqa: E402
import third                                                # noqa: E402
import upstream                                             # noqa: E402
import userspace                                           # noqa: E402
import userspace_perf                                      # noqa: E402
from auth import AUTH, PSK, STATUS_AUTH                     # noqa: E402
from backends import BACKENDS                               # noqa: E402
from capture import ESP, IKE, Capture                       # noqa: E402
from hosts import TUNNEL_PORT, Host, Topology               # noqa: E402
from monitor import Monitor, tunnel_established             # noqa: E402
from proc import Shell, wait_for                            # noqa: E402

RESULTS = Path("/results")
WORK = Path("/tmp/lab")
KERNEL_MODULES = ("openvswitch vport-geneve vport-vxlan vport-gre geneve vxlan ip_gre ip6_gre veth "
                  "xfrm_user esp4 esp6 gcm aesni_intel ghash-clmulni-intel seqiv").split()
# A scenario's `expect` names the rule its result must meet. "encrypted": the overlay works and
# the wire shows only ESP, and both monitors say so, with the scenario's auth method and peer
# name (auth_ok: a certificate scenario cannot pass by authenticating some other way).
# "guarded" (guard.py): other_config:ipsec_skb_mark=0/1 on both hosts; the IPsec tunnel is still
# "encrypted", a second, non-IPsec tunnel is dropped by the guard while OpenFlow does not mark its
# packets (no reply, none of its packets on the wire) and works once OpenFlow sets pkt_mark=1 (its
# packets then plaintext on the wire, as a non-IPsec tunnel's are).
EXPECTATIONS = {
    "encrypted": lambda r: (r["ping_ok"] and r["esp_packets"] > 0 and r["plaintext_packets"] == 0
                            and r["status_ok"] and r["auth_ok"] and r.get("oracle_ok")),
}
EXPECTATIONS["last-good"] = lambda r: EXPECTATIONS["encrypted"](r) and r.get("last_good_ok")
EXPECTATIONS["guarded"] = lambda r: (
    EXPECTATIONS["encrypted"](r)
    and (r.get("guard_policies") or 0) > 0
    and r.get("plain_blocked_ok") and r.get("plain_marked_ok"))
ESTABLISH_TIMEOUT = 60      # seconds for both monitors to report the tunnel established
PING = ["ping", "-c", "5", "-i", "0.5", "-W", "2"]


def say(msg: str) -> None:
    print(f"LAB: {msg}", flush=True)


def kernel_args() -> dict:
    return dict(a.split("=", 1) for a in Path("/proc/cmdline").read_text().split() if a.startswith("lab_") and "=" in a)


class Steps:
    """Remembers the step a scenario is in (named in the result when it breaks) and times each."""

    def __init__(self, name: str, sh: Shell):
        self.name, self.current, self.t0, self.times = name, "start", time.monotonic(), {}
        self._t, self.sh = self.t0, sh

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        self.times[self.current] = round(now - self._t, 1)
        self.current, self._t = step, now
        self.sh.note(f"step {step} (at {self.elapsed()}s)")

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)


def _ask(how):
    """A status query that never raises: a monitor not up yet, or broken, answers with the error."""
    try:
        return how()
    except Exception as e:
        return {"error": str(e)}


def wait_established(monitors: list) -> tuple:
    """Poll every monitor until all report the tunnel established (or time runs out).

    Polling goes straight to the monitors' control sockets with ovs-appctl (Monitor.poll): the
    operator's `ovs-ipsec status --json` costs 2-4 s of Python start-up under TCG, so it is run
    once afterwards (final_status), and its answer is what the pass rules read."""
    def query(m):
        return _ask(m.poll)

    deadline = time.monotonic() + ESTABLISH_TIMEOUT
    with ThreadPoolExecutor(max_workers=len(monitors)) as pool:
        while True:
            last = dict(zip((m.host.name for m in monitors), pool.map(query, monitors), strict=True))
            if all(tunnel_established(last[m.host.name], m.tunnel)[0] for m in monitors):
                return True, last
            if time.monotonic() >= deadline:
                return False, last
            time.sleep(0.5)


def final_status(monitors: list) -> dict:
    """`ovs-ipsec status --json` on every host, in parallel: {host name: status JSON}."""
    with ThreadPoolExecutor(max_workers=len(monitors)) as pool:
        return dict(zip((m.host.name for m in monitors), pool.map(lambda m: _ask(m.status), monitors),
                        strict=True))


def auth_matches(sc: scenarios.Scenario, monitor: Monitor, status: dict, peer) -> bool:
    """The monitor reports the tunnel with the scenario's auth method (status `auth`: psk,
    peer-cert or ca-cert) and, with certificates, the peer's name (its certificate's CN)."""
    entry = tunnel_established(status or {}, monitor.tunnel)[1] or {}
    if entry.get("auth") != STATUS_AUTH[sc.auth]:
        return False
    return sc.auth == "psk" or entry.get("remote_name") == peer.name


def ping(topology: Topology, out: Path) -> dict:
    """Overlay ping h1 -> h2. One unchecked ping first resolves ARP through the tunnel; then
    5 pings, and the overlay counts as working when at least one of them is answered."""
    h1, h2 = topology.hosts
    h1.sh.run(["ping", "-c", "1", "-W", "3", h2.overlay_ip], netns=h1.name, check=False)
    cp = h1.sh.run([*PING, h2.overlay_ip], netns=h1.name, check=False, timeout=30)
    (out / "ping.txt").write_text(cp.stdout + cp.stderr)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", cp.stdout)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return {"ping_ok": received >= 1, "ping_sent": sent, "ping_received": received}


def _ping_counts(topology: Topology, out: Path) -> tuple[int, int]:
    counts = ping(topology, out)
    return counts["ping_sent"], counts["ping_received"]


def run_systemd_scenario(sc: scenarios.Scenario) -> dict:
    """host = "systemd": two systemd-nspawn machines booting Debian's systemd (guest/systemd_lab.py)."""
    import systemd_lab

    out = RESULTS / sc.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    say(f"[{sc.name}] start: systemd hosts, {sc.expect}, {sc.tunnel}/{sc.auth}, skb_mark {sc.skb_mark or 'unset'}")
    result = systemd_lab.run_scenario(sc, out, Shell(out / "commands.log"))
    result["seconds"] = round(time.monotonic() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_scenario(sc: scenarios.Scenario, capture_golden: bool = False) -> dict:
    if sc.host == "systemd":
        return run_systemd_scenario(sc)
    out = RESULTS / sc.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = WORK / sc.name
    sh = Shell(out / "commands.log")
    topology = Topology(sc, work, sh)
    h1, h2 = topology.hosts
    backend = BACKENDS[sc.backend]()
    control = ovn.Ovn(sc.tunnel, work, sh) if sc.control == "ovn" else None
    capture = Capture(h2, out / "underlay.pcap")
    monitors = []
    # lab/run.sh --golden: the IKE daemons' outputs for tests/unit/golden (guest/golden.py).
    events = golden.StrongSwanEvents(sc.name, backend, h1) if capture_golden and sc.backend == "strongswan" else None
    steps = Steps(sc.name, sh)
    result = {**sc.summary(), "ping_ok": False, "esp_packets": 0, "plaintext_packets": None,
              "ike_packets": 0, "status_ok": False, "auth_ok": False, "oracle_ok": False, "pass": False,
              "error": None, "status": {}, "checks": {}}
    say(f"[{sc.name}] start: {sc.tunnel}/{sc.auth}/{sc.backend} by {sc.control}, {sc.underlay} underlay, "
        f"options {sc.options}")
    try:
        steps("underlay")
        topology.up()
        # Capture from before the first tunnel packet: a leak during bring-up counts too.
        steps("capture")
        capture.start()
        steps("daemons")
        monitors = [make_monitor(sc, backend, h1, h2), make_monitor(sc, backend, h2, h1)]
        if control:
            control.start()
        if sc.peer_delay:
            late_peer(sc, backend, monitors, steps, result)
        else:
            bring_up(monitors, backend)
        if events:
            events.start()
        steps(sc.control)
        if not sc.peer_delay:
            # Two operators, one per hypervisor, at the same time.
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(lambda pair: configure(sc, control, *pair), zip(monitors, (h2, h1), strict=True)))
        steps("establish")
        trigger = start_trigger(topology, monitors) if sc.trap_only else None
        established, _ = wait_established(monitors)
        if trigger:
            trigger.result()
        say(f"[{sc.name}] monitors report established: {established} ({steps.elapsed()}s)")
        # The operator's status command runs while h1 pings (Python start-up overlaps the ping).
        steps("ping")
        with ThreadPoolExecutor(max_workers=1) as pool:
            asked = pool.submit(final_status, monitors)
            result.update(ping(topology, out))
            statuses = asked.result()
        for m in monitors:
            status = statuses[m.host.name]
            (out / f"{m.host.name}-status.json").write_text(json.dumps(status, indent=2) + "\n")
            result["status"][m.host.name] = tunnel_established(status, m.tunnel)[1] or status
        result["status_ok"] = established and all(tunnel_established(statuses[m.host.name], m.tunnel)[0]
                                                  for m in monitors)
        result["auth_ok"] = all(auth_matches(sc, m, statuses.get(m.host.name), peer)
                                for m, peer in zip(monitors, (h2, h1), strict=True))
        if hasattr(backend, "checks"):
            for h in topology.hosts:
                result["checks"].update({f"{h.name}_{k}": v for k, v in backend.checks(h).items()})
        if sc.expect == "guarded":
            guard_phases(topology, capture, steps, result, out)
        if sc.expect == "last-good":
            steps("last-good")
            result.update(lastgood.phases(h1, monitors[0], monitors[0].tunnel, PSK,
                                          lambda: _ping_counts(topology, out)))
        if sc.third_host:
            third.phase(sc, topology, backend, monitors, steps, result, out)
        if capture_golden:
            steps("golden")
            golden.capture(sc.name, backend, topology.hosts)
    except Exception as e:
        result["error"] = f"{steps.current}: {e}"
        (out / "error.txt").write_text(traceback.format_exc())
        say(f"[{sc.name}] ERROR in step {steps.current}: {e}")
    finally:
        steps("teardown")
        # The oracle's keys: the SAs h1's kernel holds, read before anything stops (a stopping
        # IKE daemon deletes them), kept in the VM's work folder, never in /results.
        keys_from = None
        try:
            keys_from = userspace.save_xfrm_state(h1, work / "h1-xfrm-state.txt") if h1.dir.exists() else None
        except Exception as e:
            say(f"[{sc.name}] ip xfrm state: {e}")
        if events:
            _quietly(events.stop)
        try:
            capture.stop()
            if capture.pcap.exists():
                with ThreadPoolExecutor(max_workers=4) as pool:
                    counts = [pool.submit(capture.count, f) for f in (ESP, sc.plaintext_filter, IKE)]
                    text = pool.submit(capture.text)
                    result["esp_packets"], result["plaintext_packets"], result["ike_packets"] = \
                        (c.result() for c in counts)
                    (out / "underlay.txt").write_text(text.result())
            # pcap-decrypt as an independent oracle: every ESP packet must decrypt with the kernel's
            # keys to the scenario's tunnel type, carrying the overlay's ARP and pings only.
            if result["esp_packets"] and keys_from:
                result.update(userspace.kernel_oracle(sc, h1, capture.pcap, keys_from, out))
        except Exception as e:
            result["error"] = result["error"] or f"capture: {e}"
        teardown(topology, backend, control, monitors, out)
        steps("done")
    # Named checks of a scenario kind (a backend's files, a late peer's quiet wait) must all hold too.
    result["pass"] = bool(not result["error"] and EXPECTATIONS[sc.expect](result) and all(result["checks"].values()))
    result["seconds"] = steps.elapsed()
    result["step_seconds"] = steps.times
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def bring_up(monitors: list, backend) -> None:
    """Both hosts' daemons at the same time, as two hypervisors would boot: on each, OVS and the
    IKE daemon (independent of each other), then the monitor, which needs both. (Upstream's
    strongSwan mode starts its own charon: no IKE daemon is started for it.)"""
    with ThreadPoolExecutor(max_workers=2 * len(monitors)) as pool:
        started = [pool.submit(Host.start_ovs, m.host) for m in monitors]
        started += [pool.submit(backend.start, m.host) for m in monitors if getattr(m, "needs_backend", True)]
        for f in started:
            f.result()
        for f in [pool.submit(m.start) for m in monitors]:
            f.result()


def make_monitor(sc: scenarios.Scenario, backend, host: Host, peer: Host):
    """Ours, or Debian's upstream ovs-monitor-ipsec on the host the scenario names (guest/upstream.py)."""
    if sc.upstream == host.name:
        return upstream.UpstreamMonitor(host, backend, tunnel_name(sc, peer), peer,
                                        children=1 if sc.tunnel == "gre" else 2)
    return Monitor(host, backend, tunnel_name(sc, peer))


def tunnel_name(sc: scenarios.Scenario, peer: Host) -> str:
    return ovn.tunnel_name(peer) if sc.control == "ovn" else TUNNEL_PORT


def configure(sc: scenarios.Scenario, control, monitor, peer: Host) -> None:
    """What the operator types on one hypervisor (monitor.host): the bridge, the auth settings,
    the tunnel (and, for "guarded", the guard and the non-IPsec tunnel first). With OVN: the
    chassis settings, ovn-controller and a logical port; OVN makes the tunnel."""
    host = monitor.host
    if control:
        control.join(host, peer)
        return
    if sc.expect == "guarded":
        guard.configure(host, peer)
    host.add_bridge()
    options = AUTH[sc.auth](host, peer)
    if sc.auth.startswith("ca") and hasattr(monitor, "trust_ca"):
        monitor.trust_ca(host.dir / "cacert.pem")   # upstream on strongSwan: the tutorial's cacerts step
    host.add_tunnel(sc, peer, options)


def start_trigger(topology: Topology, monitors: list):
    """The first overlay packets, from h1, while the runner waits for the SAs: in a trap-only
    scenario (Scenario.trap_only) they are what starts IKE, as a VM's first packet would. They
    start once every monitor has loaded the tunnel's connections (its trap is in): a packet sent
    before that leaves in the clear because nothing is configured yet, which would be the lab's
    doing, not the monitor's."""
    h1, h2 = topology.hosts

    def loaded(m) -> bool:
        entry = next((t for t in _ask(m.poll).get("tunnels", []) if t.get("name") == m.tunnel), None)
        return bool(entry) and entry.get("state") in ("loaded", "negotiating", "established")

    def trigger():
        wait_for(lambda: all(loaded(m) for m in monitors), timeout=ESTABLISH_TIMEOUT / 2, interval=0.5)
        return h1.sh.run(["ping", "-c", "8", "-i", "1", "-W", "1", h2.overlay_ip], netns=h1.name,
                         check=False, timeout=30)

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(trigger)
    pool.shutdown(wait=False)
    return future


def late_peer(sc: scenarios.Scenario, backend, monitors: list, steps: Steps, result: dict) -> None:
    """upstream's "reconciliation interval" case: h1 alone (daemons up, tunnel configured) for
    sc.peer_delay seconds, during which its connection must be loaded once and never replaced or
    removed (checks no_flap_*); then h2 boots and is configured, and the tunnel must come up."""
    first, second = monitors
    bring_up([first], backend)
    configure(sc, None, first, second.host)
    time.sleep(sc.peer_delay)
    counts = applied_actions(first.host.dir / "ovs-monitor-ipsec.log")
    result["late_peer_h1_actions"] = counts
    result["checks"]["no_flap_loaded_once"] = counts.get("LoadConn", 0) == 1
    result["checks"]["no_flap_never_unloaded"] = counts.get("UnloadConn", 0) == 0
    steps("late-peer")
    bring_up([second], backend)
    configure(sc, None, second, first.host)
    result["late_peer_configured_at"] = steps.elapsed()


def applied_actions(log: Path) -> dict:
    """How many actions of each kind our monitor applied, from its per-pass "applied ..." lines."""
    counts: dict = {}
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if "| INFO | applied " in line:
            for number, kind in re.findall(r"(\d+) (\w+)", line.split(" applied ", 1)[1].split(" for ")[0]):
                counts[kind] = counts.get(kind, 0) + int(number)
    return counts


def guard_phases(topology: Topology, capture: Capture, steps: Steps, result: dict, out: Path) -> None:
    """The plain (non-IPsec) tunnel under the guard: first unmarked (must be dropped, nothing on
    the wire), then marked by OpenFlow (must work, plaintext on the wire). The underlay capture
    keeps running; the plain tunnel's packets are counted in it at the phase boundary."""
    h1, h2 = topology.hosts
    result.update({"guard_policies": 0, "plain_blocked_ping_received": None, "plain_blocked_plaintext": None,
                   "plain_blocked_out_pol_block": None, "plain_blocked_ok": False,
                   "plain_marked_ping_sent": 0, "plain_marked_ping_received": 0,
                   "plain_marked_plaintext": None, "plain_marked_ok": False})
    steps("guard-blocked")
    # The monitor installs the guard when it reads ipsec_skb_mark; it has long done so by now
    # (the IPsec tunnel is up), but wait for it rather than assume it.
    wait_for(lambda: all(guard.guard_policies(h) > 0 for h in topology.hosts), timeout=30)
    result["guard_policies"] = min(guard.guard_policies(h) for h in topology.hosts)
    blocked_before = guard.out_pol_block(h1)
    _, received = guard.ping(h1, h2, out, "blocked", 3)
    result["plain_blocked_ping_received"] = received
    result["plain_blocked_out_pol_block"] = guard.out_pol_block(h1) - blocked_before
    time.sleep(1)   # let tcpdump -U write whatever is still in flight
    # Reading the pcap while tcpdump still writes it: -U flushes every packet.
    result["plain_blocked_plaintext"] = capture.count(guard.WIRE)
    (out / "guard-blocked-flows.txt").write_text("\n".join(guard.flows(h) for h in topology.hosts))
    result["plain_blocked_ok"] = received == 0 and result["plain_blocked_plaintext"] == 0
    steps("guard-marked")
    for h in topology.hosts:
        guard.add_mark_flow(h)
    sent, received = guard.ping(h1, h2, out, "marked", 5)
    result["plain_marked_ping_sent"], result["plain_marked_ping_received"] = sent, received
    time.sleep(1)
    result["plain_marked_plaintext"] = capture.count(guard.WIRE) - result["plain_blocked_plaintext"]
    (out / "guard-marked-flows.txt").write_text("\n".join(guard.flows(h) for h in topology.hosts))
    result["plain_marked_ok"] = received >= 1 and result["plain_marked_plaintext"] > 0


def teardown(topology: Topology, backend, control, monitors: list, out: Path) -> None:
    """Keep each host's state, stop what the scenario started (ovn-controller, monitor, IKE
    daemon, OVS; then the OVN central), keep their logs, drop the netns. The two hosts are torn
    down in parallel."""
    by_host = {m.host.name: m for m in monitors}
    hosts = [h for h in topology.all_hosts if h.dir.exists()]

    def state(host):
        # Both snapshots before anything stops: a stopping charon deletes its peer's SAs too.
        _quietly(lambda: (out / f"{host.name}-state.txt").write_text(host.snapshot()))

    def one(host):
        if control:
            _quietly(control.leave, host)
        if host.name in by_host:
            _quietly(by_host[host.name].stop)
        _quietly(backend.stop, host)
        _quietly(host.stop_ovs)
        monitor_logs = by_host[host.name].logs if host.name in by_host else Monitor.logs
        logs = ("ovsdb-server.log", "ovs-vswitchd.log", *backend.logs, *monitor_logs,
                *(control.chassis_logs if control else ()))
        for log in logs:
            if (host.dir / log).exists():
                shutil.copy2(host.dir / log, out / f"{host.name}-{log}")
        # The certificates a host was given (never its private key), for `ovs-ipsec pki show`.
        for pem in sorted(host.dir.glob("*.pem")):
            if "privkey" not in pem.name:
                (out / f"{host.name}-certs").mkdir(exist_ok=True)
                shutil.copy2(pem, out / f"{host.name}-certs" / pem.name)

    with ThreadPoolExecutor(max_workers=len(topology.hosts)) as pool:
        list(pool.map(state, hosts))
        list(pool.map(one, hosts))
    if control:
        _quietly(control.stop)
        for log in control.logs:
            if (control.dir / log).exists():
                shutil.copy2(control.dir / log, out / f"central-{log}")
    topology.down()


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        say(f"teardown: {getattr(fn, '__qualname__', fn)}: {e}")


# What each version in the results names: Debian's package version (dpkg), or a command's first line.
VERSION_PACKAGES = {"strongswan": "charon-systemd", "openvswitch": "openvswitch-switch", "ovn": "ovn-host",
                    "python3": "python3"}


def versions() -> dict:
    """The components this boot tests (LAB-VERSIONS: latest.json, the README's lab table)."""
    found = {"kernel": Path("/proc/sys/kernel/osrelease").read_text().strip()}
    for name, package in VERSION_PACKAGES.items():
        cp = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
        found[name] = cp.stdout.strip() or None
    # LibreSwan is unpacked, not installed (labhost/image.py): dpkg does not know it.
    cp = subprocess.run(["ipsec", "--version"], capture_output=True, text=True)
    found["libreswan"] = (cp.stdout.strip().splitlines() or [None])[0]
    found["debian"] = Path("/etc/debian_version").read_text().strip()
    found["ovs_ipsec_import"] = import_check()
    return found


# Imports every module of the project with the guest's python3 (Debian 12's 3.11, Debian 13's 3.13)
# and its dependencies from the overlay: a module that no longer imports on a newer Python shows
# here even when no scenario reaches it. (On Debian 13 this also writes their bytecode, once.)
IMPORT_ALL = """
import importlib, pkgutil, sys, ovs_ipsec
names = [m.name for m in pkgutil.walk_packages(ovs_ipsec.__path__, "ovs_ipsec.")]
for name in names:
    importlib.import_module(name)
print("%d modules imported with Python %d.%d.%d" % (len(names), *sys.version_info[:3]))
"""


def import_check() -> str:
    from monitor import PYTHON_ENV
    cp = subprocess.run(["python3", "-c", IMPORT_ALL], capture_output=True, text=True,
                        env={**os.environ, **PYTHON_ENV}, timeout=300)
    if cp.returncode != 0:
        say(f"ERROR: the project does not import with this python3:\n{cp.stderr[-2000:]}")
        return f"FAILED: {(cp.stderr.strip().splitlines() or ['?'])[-1]}"
    return cp.stdout.strip()


def main() -> int:
    if not RESULTS.is_mount():
        RESULTS.mkdir(parents=True, exist_ok=True)   # no share: results stay on the console
    args = kernel_args()
    selected = scenarios.load(Path(__file__).with_name("scenarios.toml"))
    if args.get("lab_only"):
        wanted = args["lab_only"].split(",")
        selected = [s for s in selected if s.name in wanted]
    for mod in KERNEL_MODULES:
        subprocess.run(["modprobe", "-q", mod], check=False)
    # lab/run.sh --repeat N: run the selection N times (hunting an intermittent failure);
    # the second run of gre-psk is named gre-psk.2, and so on.
    repeat = int(args.get("lab_repeat", "1"))
    selected = [sc if i == 1 else dataclasses.replace(sc, name=f"{sc.name}.{i}")
                for i in range(1, repeat + 1) for sc in selected]
    print("LAB-VERSIONS " + json.dumps(versions()), flush=True)
    say(f"running {len(selected)} scenario(s): {', '.join(s.name for s in selected)}")
    results = []
    for sc in selected:
        if sc.control == "userspace-esp":
            res = (userspace_perf if sc.expect == "throughput" else userspace).run(sc, RESULTS, WORK, say)
        else:
            res = run_scenario(sc, capture_golden=args.get("lab_golden") == "1")
        results.append(res)
        print("LAB-RESULT " + json.dumps(res), flush=True)
        say(f"[{sc.name}] {'PASS' if res['pass'] else 'FAIL'} in {res['seconds']}s")
    (RESULTS / "guest-results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
