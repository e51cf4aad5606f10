"""ovsdb-server with the Open_vSwitch schema for one test host, and ovs-vsctl against it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ovs_ipsec.runner import run

from .procs import kill_pidfile

VSWITCH_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


class Ovsdb:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    @property
    def remote(self) -> str:
        return f"unix:{self.workdir}/db.sock"

    @property
    def env(self) -> dict[str, str]:
        """OVS's tools look for their run, db, log and config folders here, not in the system's."""
        d = str(self.workdir)
        return {**os.environ, "OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d, "OVS_SYSCONFDIR": d}

    def start(self) -> None:
        d = self.workdir
        if not (d / "conf.db").exists():
            run(["ovsdb-tool", "create", f"{d}/conf.db", VSWITCH_SCHEMA])
        subprocess.run(["ovsdb-server", f"{d}/conf.db", f"--remote=punix:{d}/db.sock",
                        f"--pidfile={d}/ovsdb-server.pid", f"--unixctl={d}/ovsdb-server.ctl",
                        "--detach", "--no-chdir", f"--log-file={d}/ovsdb-server.log", "-vconsole:off"],
                       env=self.env, check=True, timeout=30, stderr=subprocess.DEVNULL)  # its log has it all
        self.vsctl("init")
        self.vsctl("--may-exist", "add-br", "br-ipsec")

    def stop(self) -> None:
        kill_pidfile(self.workdir / "ovsdb-server.pid")

    def vsctl(self, *args: str) -> str:
        # --no-wait: no ovs-vswitchd runs here, and ovs-vsctl would wait for it forever.
        return run(["ovs-vsctl", f"--db={self.remote}", "--no-wait", "--timeout=10", *args], timeout=20).stdout
