"""Our monitor for one test host, started exactly as an operator would, and its status queries."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from ovs_ipsec.runner import run

from .procs import kill_pid, read_pid, socket_answers, unlink, wait_for, wait_gone


class Monitor:
    def __init__(self, name: str, workdir: Path, netns: list[str], database: str, env: dict[str, str]) -> None:
        self.name = name
        self.workdir = workdir
        self._netns = netns
        self._database = database
        self._env = env

    @property
    def unixctl(self) -> str:
        return f"{self.workdir}/ovs-monitor-ipsec.ctl"

    @property
    def pidfile(self) -> Path:
        return self.workdir / "ovs-monitor-ipsec.pid"

    def start(self, daemon_flags: list[str], *extra: str) -> None:
        d = self.workdir
        argv = [*self._netns, sys.executable, "-m", "ovs_ipsec.cli.main", "monitor", self._database, *daemon_flags,
                f"--unixctl={self.unixctl}", f"--pidfile={self.pidfile}", f"--log-file={d}/ovs-monitor-ipsec.log",
                "--detach", "--no-chdir", "-vconsole:off", *extra]
        subprocess.run(argv, env=self._env, check=True, timeout=60)
        wait_for(lambda: socket_answers(self.unixctl), 20, what=f"monitor control socket on {self.name}")

    def pid(self) -> int | None:
        return read_pid(self.pidfile)

    def stop(self, cleanup: bool = False, hard: bool = False) -> None:
        pid = self.pid()
        if pid is None:
            return
        if hard:
            kill_pid(pid, signal.SIGKILL)
        else:
            self.appctl("exit", *([] if cleanup else ["--no-cleanup"]), timeout=90)
            wait_gone(pid, 30)
        unlink(self.pidfile, self.unixctl)

    def terminate(self) -> None:
        """SIGTERM by PID and wait until it is gone: the monitor dies without cleaning anything up."""
        pid = self.pid()
        if pid is not None:
            kill_pid(pid, signal.SIGTERM, timeout=30)
        unlink(self.pidfile, self.unixctl)

    def appctl(self, *args: str, timeout: float = 30) -> str:
        return run(["ovs-appctl", "-t", self.unixctl, *args], timeout=timeout).stdout

    def status(self) -> dict:
        return json.loads(self.appctl("tunnels/show", "--json"))

    def tunnel(self, name: str) -> dict | None:
        return next((t for t in self.status()["tunnels"] if t["name"] == name), None)

    def wait_state(self, name: str, state: str | tuple[str, ...], timeout: float = 30) -> dict:
        """`state`, or any of several (a tunnel may pass one on its way: "loaded" or later)."""
        states = (state,) if isinstance(state, str) else state
        return wait_for(lambda: _if(self.tunnel(name), lambda t: t["state"] in states), timeout,
                        what=f"tunnel {name} on {self.name} to be {' or '.join(states)} (now {self.tunnel(name)})")

    def wait_ike_up(self, name: str, timeout: float = 30) -> dict:
        """The tunnel's IKE SA is up. On a host whose kernel has no ESP (this build machine), that is
        as far as a tunnel gets: its child SAs cannot be installed, so it stays `negotiating`."""
        return wait_for(lambda: _if(self.tunnel(name), lambda t: t["ike_sas"] > 0 and not t["last_good_since"]
                                    and t["state"] in ("negotiating", "established")), timeout,
                        what=f"tunnel {name} on {self.name} to have its IKE SA up (now {self.tunnel(name)})")

    def log_text(self) -> str:
        path = self.workdir / "ovs-monitor-ipsec.log"
        return path.read_text() if path.exists() else ""


def _if(tunnel: dict | None, condition) -> dict | None:
    return tunnel if tunnel is not None and condition(tunnel) else None
