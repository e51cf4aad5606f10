"""OVN in the sandbox: a central (NB and SB ovsdb-servers, ovn-northd) and chassis, each a sandbox
Host (network namespace, its own Open_vSwitch ovsdb-server, charon and our monitor) plus its own
ovn-controller. Used by the OVN functional tests and `make demo-ovn`, never by the daemon.

No ovs-vswitchd runs: ovn-controller creates its tunnel ports in OVSDB all the same (it waits for
br-int's OpenFlow socket in vain, which does not matter here), and every ovs-vsctl call uses
--no-wait. Certificates come from our own `ovs-ipsec pki`: one CA, one certificate per chassis
whose CN is the chassis name, since OVN names the peer by its chassis name (options:remote_name).

The central runs in the root namespace but listens only on unix sockets in its work folder.
Everything started here is stopped by PID on close.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ovs_ipsec.runner import run

from .procs import kill_pid, kill_pidfile, read_pid, wait_for
from .sandbox import Host, Sandbox

NB_SCHEMA = "/usr/share/ovn/ovn-nb.ovsschema"
SB_SCHEMA = "/usr/share/ovn/ovn-sb.ovsschema"
PKI = (sys.executable, "-m", "ovs_ipsec.cli.pki_main")


def ovn_missing() -> str | None:
    """Why OVN cannot run here, or None."""
    for path in (NB_SCHEMA, SB_SCHEMA, "/usr/bin/ovn-northd", "/usr/bin/ovn-controller", "/usr/bin/ovn-nbctl"):
        if not os.path.exists(path):
            return f"{path} is missing (Debian packages ovn-central and ovn-host; run make setup)"
    return None


@dataclass
class OvnCentral:
    workdir: Path

    @property
    def nb_db(self) -> str:
        return f"unix:{self.workdir}/ovnnb_db.sock"

    @property
    def sb_db(self) -> str:
        return f"unix:{self.workdir}/ovnsb_db.sock"

    @property
    def env(self) -> dict[str, str]:
        d = str(self.workdir)
        dirs = {f"{kind}_{what}": d for kind in ("OVS", "OVN") for what in ("RUNDIR", "LOGDIR", "DBDIR")}
        return {**os.environ, **dirs}

    def start(self) -> None:
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        for db, schema in (("ovnnb_db", NB_SCHEMA), ("ovnsb_db", SB_SCHEMA)):
            run(["ovsdb-tool", "create", f"{d}/{db}.db", schema])
            subprocess.run(["ovsdb-server", f"{d}/{db}.db", f"--remote=punix:{d}/{db}.sock",
                            f"--pidfile={d}/{db}.pid", f"--unixctl={d}/{db}.ctl", "--detach", "--no-chdir",
                            f"--log-file={d}/{db}.log", "-vconsole:off"],
                           env=self.env, check=True, timeout=30, stderr=subprocess.DEVNULL)
        self.nbctl("init")
        run(["ovn-sbctl", f"--db={self.sb_db}", "--timeout=10", "init"], timeout=20)
        subprocess.run(["ovn-northd", f"--ovnnb-db={self.nb_db}", f"--ovnsb-db={self.sb_db}",
                        f"--pidfile={d}/ovn-northd.pid", f"--unixctl={d}/ovn-northd.ctl", "--detach",
                        "--no-chdir", f"--log-file={d}/ovn-northd.log", "-vconsole:off"],
                       env=self.env, check=True, timeout=30, stderr=subprocess.DEVNULL)

    def nbctl(self, *args: str) -> str:
        return run(["ovn-nbctl", f"--db={self.nb_db}", "--timeout=10", *args], timeout=20).stdout

    def sbctl(self, *args: str) -> str:
        return run(["ovn-sbctl", f"--db={self.sb_db}", "--timeout=10", *args], timeout=20).stdout

    def set_ipsec(self, enabled: bool) -> None:
        self.nbctl("set", "nb_global", ".", f"ipsec={'true' if enabled else 'false'}")

    def stop(self) -> None:
        for name in ("ovn-northd", "ovnsb_db", "ovnnb_db"):
            kill_pidfile(self.workdir / f"{name}.pid")


@dataclass
class Chassis:
    """A Host that is also an OVN chassis named `name`, its encapsulation IP the host's address."""

    host: Host
    name: str
    controller_pid: int | None = field(default=None)

    @property
    def encap_ip(self) -> str:
        return self.host.address

    def configure(self, central: OvnCentral, pki_dir: Path) -> None:
        """The chassis keys ovn-controller reads, and the certificate keys our monitor reads."""
        self.host.vsctl(
            "set", "Open_vSwitch", ".", f"external_ids:system-id={self.name}", f"external_ids:hostname={self.name}",
            f"external_ids:ovn-remote={central.sb_db}", "external_ids:ovn-encap-type=geneve",
            f"external_ids:ovn-encap-ip={self.encap_ip}", "external_ids:ovn-bridge-datapath-type=netdev",
            f"other_config:certificate={pki_dir}/{self.name}-cert.pem",
            f"other_config:private_key={pki_dir}/{self.name}-privkey.pem",
            f"other_config:ca_cert={pki_dir}/pki/switchca/cacert.pem")

    def start_ovn_controller(self) -> None:
        d = self.host.workdir
        env = {**self.host.env, "OVN_RUNDIR": str(d), "OVN_LOGDIR": str(d), "OVN_DBDIR": str(d)}
        # 23.03 has no --unixctl option: its control socket is <OVN_RUNDIR>/ovn-controller.<pid>.ctl.
        subprocess.run(self.host.netns("ovn-controller", self.host.db, f"--pidfile={d}/ovn-controller.pid",
                                       "--detach", "--no-chdir", f"--log-file={d}/ovn-controller.log",
                                       "-vconsole:off"),
                       env=env, check=True, timeout=30, stderr=subprocess.DEVNULL)
        self.controller_pid = read_pid(d / "ovn-controller.pid")

    def stop_ovn_controller(self) -> None:
        if self.controller_pid is not None:
            kill_pid(self.controller_pid, signal.SIGTERM)
            self.controller_pid = None

    def interfaces(self) -> dict[str, dict]:
        """{name: {"options": {...}, "external_ids": {...}}} for every Interface row."""
        reply = json.loads(self.host.vsctl("--format=json", "--columns=name,options,external_ids",
                                           "list", "Interface"))
        return {row[0]: {"options": _ovsdb_map(row[1]), "external_ids": _ovsdb_map(row[2])}
                for row in reply["data"]}

    def ovn_tunnels(self) -> dict[str, dict]:
        """The tunnels ovn-controller made, by name (ovn-<peer chassis>-<n>)."""
        return {name: row for name, row in self.interfaces().items() if name.startswith("ovn-")}


class OvnCluster:
    """An OVN central and chassis in a Sandbox; `close()` before the sandbox's own close."""

    def __init__(self, sandbox: Sandbox, monitor_args: tuple[str, ...] = ()) -> None:
        self.sandbox = sandbox
        self.central = OvnCentral(sandbox.workdir / "central")
        self.pki_dir = sandbox.workdir / "certs"
        self.monitor_args = monitor_args
        self.chassis: list[Chassis] = []
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        self._pki("init")
        self.central.start()

    def add_chassis(self, name: str, address: str) -> Chassis:
        """A new host `name` at `address` (CIDR) running ovsdb-server, charon, our monitor and
        ovn-controller, with a CA-signed certificate whose CN is `name`."""
        self._pki("req", name)
        self._pki("sign", name, "switch")
        chassis = Chassis(self.sandbox.add_host(name, address), name)
        self.chassis.append(chassis)
        chassis.host.start_ovsdb()
        chassis.configure(self.central, self.pki_dir)
        chassis.host.start_charon()
        chassis.host.start_monitor(*self.monitor_args)
        chassis.start_ovn_controller()
        return chassis

    def wait_for_tunnels(self, ipsec: bool, timeout: float = 30) -> None:
        """Until every chassis has one tunnel per other chassis, with (or without) remote_name."""
        def ready() -> bool:
            for chassis in self.chassis:
                tunnels = chassis.ovn_tunnels()
                peers = {row["options"].get("remote_ip") for row in tunnels.values()}
                if peers != {other.encap_ip for other in self.chassis if other is not chassis}:
                    return False
                if any(("remote_name" in row["options"]) != ipsec for row in tunnels.values()):
                    return False
            return True
        wait_for(ready, timeout, what=f"OVN tunnels between every chassis (ipsec={ipsec})")

    def close(self) -> None:
        for chassis in self.chassis:
            try:
                chassis.stop_ovn_controller()
            except Exception:  # keep tearing down the rest
                pass
        self.central.stop()

    def _pki(self, *args: str) -> None:
        subprocess.run([*PKI, "--dir", str(self.pki_dir / "pki"), *args], cwd=self.pki_dir, check=True,
                       capture_output=True, timeout=60)


def _ovsdb_map(value) -> dict[str, str]:
    """OVSDB JSON ["map", [[k, v], ...]] -> dict."""
    return dict(value[1]) if isinstance(value, list) and value and value[0] == "map" else {}
