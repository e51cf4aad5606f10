"""ovsdb-server with the Open_vSwitch schema for one test host, and ovs-vsctl against it."""

from __future__ import annotations

import json
import os
import socket
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

    def add_raw_interface(self, name: str, interface_type: str, options: dict[str, str],
                          bridge: str = "br-ipsec") -> None:
        """Add a port whose name and option values are exactly these strings (newlines, quotes, any
        Unicode), through OVSDB's own JSON-RPC: ovs-vsctl would parse its arguments first."""
        ops = [
            {"op": "insert", "table": "Interface", "uuid-name": "iface",
             "row": {"name": name, "type": interface_type, "options": ["map", sorted(options.items())]}},
            {"op": "insert", "table": "Port", "uuid-name": "port",
             "row": {"name": name, "interfaces": ["named-uuid", "iface"]}},
            {"op": "mutate", "table": "Bridge", "where": [["name", "==", bridge]],
             "mutations": [["ports", "insert", ["set", [["named-uuid", "port"]]]]]},
        ]
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.workdir / "db.sock"))
            sock.sendall(json.dumps({"method": "transact", "params": ["Open_vSwitch", *ops], "id": 1}).encode())
            decoder, buffer = json.JSONDecoder(), b""
            while True:
                buffer += sock.recv(65536)
                try:
                    reply, _ = decoder.raw_decode(buffer.decode())
                    break
                except ValueError:
                    continue
        errors = [result for result in reply.get("result") or [] if "error" in result]
        if reply.get("error") or errors:
            raise RuntimeError(f"OVSDB refused {name!r}: {reply.get('error') or errors[0]}")
