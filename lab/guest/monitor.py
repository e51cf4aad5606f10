"""The project's monitor (ovs_ipsec), started and queried exactly as the command-line contract says."""

import json

from hosts import TUNNEL_PORT, Host
from proc import stop_pidfile, wait_for

# The overlay disk (mounted at /opt/ovs-ipsec) holds the project's src/ and its PyPI dependencies,
# byte-compiled on the host when it has the guest's Python; otherwise Python writes the bytecode
# there on first import (the overlay is writable, and a snapshot), so only the first process pays.
PYTHON_ENV = {"PYTHONPATH": "/opt/ovs-ipsec/src:/opt/ovs-ipsec/pydeps"}
CLI = ["python3", "-m", "ovs_ipsec.cli.main"]


class Monitor:
    logs = ("ovs-monitor-ipsec.log", "monitor.out")

    def __init__(self, host: Host, backend, tunnel: str = TUNNEL_PORT):
        self.host, self.backend = host, backend
        self.tunnel = tunnel   # the name of the tunnel this host must report established
        self.ctl = host.dir / "ovs-monitor-ipsec.ctl"
        self.pidfile = host.dir / "ovs-monitor-ipsec.pid"

    def start(self) -> None:
        h, d = self.host, self.host.dir
        h.sh.run([*CLI, "monitor", h.db, *self.backend.monitor_args(h),
                  "--unixctl", self.ctl, "--pidfile", self.pidfile,
                  "--log-file", d / "ovs-monitor-ipsec.log", "--detach", "--no-chdir",
                  # Debug level in the log file only: a failed scenario's log then shows every
                  # VICI event and reconcile decision (the console stays quiet).
                  "-vfile:dbg"],
                 netns=h.name, env={**PYTHON_ENV, **h.ovs_env}, log=d / "monitor.out", timeout=90)
        if not wait_for(self.ctl.exists, timeout=30):
            raise RuntimeError(f"{h.name}: the monitor did not create {self.ctl} (see monitor.out)")

    def status(self) -> dict:
        """`ovs-ipsec status --json` for this host, parsed: the operator's command, whose answer
        the pass rules read."""
        cp = self.host.sh.run([*CLI, "status", "--unixctl", self.ctl, "--json"], env=PYTHON_ENV, timeout=30)
        return json.loads(cp.stdout)

    def poll(self) -> dict:
        """The same JSON straight from the monitor's control socket (the `tunnels/show --json`
        request that `ovs-ipsec status --json` sends), through ovs-appctl: no Python start-up
        (2-4 s under TCG), so the runner can poll every half second while IKE runs."""
        cp = self.host.sh.run(["ovs-appctl", "-t", self.ctl, "tunnels/show", "--json"], timeout=15, quiet=True)
        return json.loads(cp.stdout)

    def stop(self) -> None:
        stop_pidfile(self.pidfile)


def tunnel_established(status: dict, name: str = TUNNEL_PORT):
    """(ok, entry): ok when the monitor says the tunnel is encrypting: state `established`,
    `encrypting` true (every child SA of the tunnel installed), and at least one CHILD_SA counted."""
    for entry in status.get("tunnels", []):
        if entry.get("name") == name:
            children = entry.get("child_sas")
            count = len(children) if isinstance(children, (list, dict)) else int(children or 0)
            return entry.get("state") == "established" and entry.get("encrypting") is True and count > 0, entry
    return False, None
