"""The lab's scenario runner: runs inside the VM (Debian's python3) as a child of init.sh.

For each scenario of scenarios.toml (or the subset named by lab_only= on the kernel command
line) it builds two hosts, lets our monitor encrypt the OVS tunnel between them, proves it with
ping and an underlay capture, prints one `LAB-RESULT {json}` line on the console and keeps the
scenario's logs in /results/<name>/ (lab/results/<name>/ on the host). Then it tears everything
down, so the next scenario starts from a clean kernel.
"""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenario as scenarios                                # noqa: E402
from auth import AUTH                                       # noqa: E402
from backends import BACKENDS                               # noqa: E402
from capture import ESP, IKE, Capture                       # noqa: E402
from hosts import Topology                                  # noqa: E402
from monitor import Monitor, tunnel_established             # noqa: E402
from proc import Shell                                      # noqa: E402

RESULTS = Path("/results")
WORK = Path("/tmp/lab")
KERNEL_MODULES = ("openvswitch vport-geneve vport-vxlan vport-gre geneve vxlan ip_gre ip6_gre veth "
                  "xfrm_user esp4 esp6 gcm aesni_intel ghash-clmulni-intel seqiv").split()
# A scenario's `expect` names the rule its result must meet. "encrypted": the overlay works and
# the wire shows only ESP, and both monitors say so. (A plaintext-guard scenario would add e.g.
# "blocked": IKE fails on purpose, ping must fail and plaintext_packets must still be 0.)
EXPECTATIONS = {
    "encrypted": lambda r: (r["ping_ok"] and r["esp_packets"] > 0 and r["plaintext_packets"] == 0
                            and r["status_ok"]),
}
ESTABLISH_TIMEOUT = 60      # seconds for both monitors to report the tunnel established
PING = ["ping", "-c", "5", "-i", "0.5", "-W", "2"]


def say(msg: str) -> None:
    print(f"LAB: {msg}", flush=True)


def kernel_args() -> dict:
    return dict(a.split("=", 1) for a in Path("/proc/cmdline").read_text().split() if a.startswith("lab_") and "=" in a)


class Steps:
    """Remembers the step a scenario is in (named in the result when it breaks) and times each."""

    def __init__(self, name: str):
        self.name, self.current, self.t0, self.times = name, "start", time.monotonic(), {}
        self._t = self.t0

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        self.times[self.current] = round(now - self._t, 1)
        self.current, self._t = step, now

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)


def wait_established(monitors: list) -> tuple:
    """Poll every monitor's status until all report the tunnel established (or time runs out).

    The hosts are asked in parallel: one `ovs-ipsec status` costs about 2 s of Python start-up
    under TCG, and asking one after the other would double the polling interval."""
    def query(m):
        try:
            return m.status()
        except Exception as e:   # not up yet, or broken: keep the message, keep polling
            return {"error": str(e)}

    deadline = time.monotonic() + ESTABLISH_TIMEOUT
    with ThreadPoolExecutor(max_workers=len(monitors)) as pool:
        while True:
            last = dict(zip((m.host.name for m in monitors), pool.map(query, monitors), strict=True))
            if all(tunnel_established(status)[0] for status in last.values()):
                return True, last
            if time.monotonic() >= deadline:
                return False, last
            time.sleep(0.5)


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


def run_scenario(sc: scenarios.Scenario) -> dict:
    out = RESULTS / sc.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = WORK / sc.name
    sh = Shell(out / "commands.log")
    topology = Topology(sc, work, sh)
    h1, h2 = topology.hosts
    backend = BACKENDS[sc.backend]()
    capture = Capture(h2, out / "underlay.pcap")
    monitors = []
    steps = Steps(sc.name)
    result = {**sc.summary(), "ping_ok": False, "esp_packets": 0, "plaintext_packets": None,
              "ike_packets": 0, "status_ok": False, "pass": False, "error": None, "status": {}}
    say(f"[{sc.name}] start: {sc.tunnel}/{sc.auth}/{sc.backend}, {sc.underlay} underlay, options {sc.options}")
    try:
        steps("underlay")
        topology.up()
        # Capture from before the first tunnel packet: a leak during bring-up counts too.
        steps("capture")
        capture.start()
        steps("daemons")
        monitors = [Monitor(h, backend) for h in topology.hosts]
        # Both hosts boot their daemons at the same time, as two hypervisors would.
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda m: bring_up(m, backend), monitors))
        steps("ovs-vsctl")
        for host, peer in ((h1, h2), (h2, h1)):
            host.add_bridge()
            host.add_tunnel(sc, peer, AUTH[sc.auth](host, peer))
        steps("establish")
        result["status_ok"], statuses = wait_established(monitors)
        for name, status in statuses.items():
            (out / f"{name}-status.json").write_text(json.dumps(status, indent=2) + "\n")
            result["status"][name] = tunnel_established(status)[1] or status
        say(f"[{sc.name}] monitors report established: {result['status_ok']} ({steps.elapsed()}s)")
        steps("ping")
        result.update(ping(topology, out))
    except Exception as e:
        result["error"] = f"{steps.current}: {e}"
        (out / "error.txt").write_text(traceback.format_exc())
        say(f"[{sc.name}] ERROR in step {steps.current}: {e}")
    finally:
        steps("teardown")
        try:
            capture.stop()
            if capture.pcap.exists():
                result["esp_packets"] = capture.count(ESP)
                result["plaintext_packets"] = capture.count(sc.plaintext_filter)
                result["ike_packets"] = capture.count(IKE)
                (out / "underlay.txt").write_text(capture.text())
        except Exception as e:
            result["error"] = result["error"] or f"capture: {e}"
        for host in topology.hosts:
            if host.dir.exists():
                (out / f"{host.name}-state.txt").write_text(host.snapshot())
        teardown(topology, backend, monitors, out)
        steps("done")
    result["pass"] = bool(not result["error"] and EXPECTATIONS[sc.expect](result))
    result["seconds"] = steps.elapsed()
    result["step_seconds"] = steps.times
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def bring_up(monitor: Monitor, backend) -> None:
    """One host's daemons, in the order a hypervisor starts them: OVS, the IKE daemon, the monitor."""
    monitor.host.start_ovs()
    backend.start(monitor.host)
    monitor.start()


def teardown(topology: Topology, backend, monitors: list, out: Path) -> None:
    """Stop what the scenario started (monitor, IKE daemon, OVS), keep their logs, drop the netns."""
    for m in monitors:
        _quietly(m.stop)
    for host in topology.hosts:
        _quietly(backend.stop, host)
        _quietly(host.stop_ovs)
        logs = ("ovsdb-server.log", "ovs-vswitchd.log", *backend.logs, *Monitor.logs)
        for log in logs:
            if (host.dir / log).exists():
                shutil.copy2(host.dir / log, out / f"{host.name}-{log}")
    topology.down()


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        say(f"teardown: {getattr(fn, '__qualname__', fn)}: {e}")


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
    say(f"running {len(selected)} scenario(s): {', '.join(s.name for s in selected)}")
    results = []
    for sc in selected:
        res = run_scenario(sc)
        results.append(res)
        print("LAB-RESULT " + json.dumps(res), flush=True)
        say(f"[{sc.name}] {'PASS' if res['pass'] else 'FAIL'} in {res['seconds']}s")
    (RESULTS / "guest-results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
