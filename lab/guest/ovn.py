"""OVN as the scenario's control plane (`control = "ovn"` in lab/scenarios.toml).

Nobody types ovs-vsctl for the tunnel here: each host is an OVN chassis and ovn-controller creates
the tunnel port, with options:remote_name=<peer chassis> once NB_Global has ipsec=true, exactly as
on a real OVN deployment. The central (NB and SB ovsdb-servers, ovn-northd) runs in the VM's root
namespace and listens on unix sockets only; a socket is a file, so the chassis reach it from their
network namespaces. One logical switch joins one logical port per chassis (an OVS internal port
on br-int carrying the host's overlay address), so the runner's overlay ping crosses the chassis.

The chassis name is the host name, which is also the CN of its CA-signed certificate (auth.ca):
OVN names the peer by its chassis name, and the monitor checks it against the certificate.
"""

from pathlib import Path

from auth import ca
from hosts import Host
from proc import Shell, stop_pidfile

NB_SCHEMA = "/usr/share/ovn/ovn-nb.ovsschema"
SB_SCHEMA = "/usr/share/ovn/ovn-sb.ovsschema"
SWITCH = "ls0"
INTEGRATION_BRIDGE = "br-int"


def tunnel_name(peer: Host) -> str:
    """The tunnel port ovn-controller creates towards `peer` (OVN 23.03: "ovn-" + the first six
    characters of the chassis name + "-" + a counter)."""
    return f"ovn-{peer.name[:6]}-0"


class Ovn:
    logs = ("ovnnb_db.log", "ovnsb_db.log", "ovn-northd.log")
    chassis_logs = ("ovn-controller.log",)

    def __init__(self, encap: str, workdir: Path, sh: Shell):
        self.encap, self.dir, self.sh = encap, workdir / "central", sh

    @property
    def env(self) -> dict:
        d = str(self.dir)
        return {f"{kind}_{what}": d for kind in ("OVS", "OVN") for what in ("RUNDIR", "LOGDIR", "DBDIR")}

    def nbctl(self, *args) -> None:
        self.sh.run(["ovn-nbctl", f"--db=unix:{self.dir}/ovnnb_db.sock", "--timeout=30", *args], timeout=40)

    def start(self) -> None:
        """The central, with IPsec on before any chassis exists: the first tunnel is already an
        IPsec tunnel, so no overlay packet can ever cross in plaintext."""
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        for db, schema in (("ovnnb_db", NB_SCHEMA), ("ovnsb_db", SB_SCHEMA)):
            self.sh.run(["ovsdb-tool", "create", d / f"{db}.db", schema])
            self.sh.run(["ovsdb-server", d / f"{db}.db", f"--remote=punix:{d}/{db}.sock",
                         f"--pidfile={d}/{db}.pid", f"--unixctl={d}/{db}.ctl", f"--log-file={d}/{db}.log",
                         "--detach", "--no-chdir"], env=self.env)
        self.nbctl("init")
        self.sh.run(["ovn-sbctl", f"--db=unix:{d}/ovnsb_db.sock", "--timeout=30", "init"], timeout=40)
        self.sh.run(["ovn-northd", f"--ovnnb-db=unix:{d}/ovnnb_db.sock", f"--ovnsb-db=unix:{d}/ovnsb_db.sock",
                     f"--pidfile={d}/ovn-northd.pid", f"--unixctl={d}/ovn-northd.ctl",
                     f"--log-file={d}/ovn-northd.log", "--detach", "--no-chdir"], env=self.env)
        self.nbctl("set", "nb_global", ".", "ipsec=true")
        self.nbctl("ls-add", SWITCH)

    def join(self, host: Host, peer: Host) -> None:
        """What an operator does on a new hypervisor: its certificate, the chassis keys,
        ovn-controller; then a VM's port on br-int."""
        ca(host, peer)   # other_config:certificate/private_key/ca_cert; OVN sets remote_name itself
        host.vsctl("add-br", INTEGRATION_BRIDGE, "--", "set", "bridge", INTEGRATION_BRIDGE, "fail-mode=secure",
                   "other_config:disable-in-band=true", "datapath_type=system")
        host.vsctl("set", "Open_vSwitch", ".", f"external_ids:system-id={host.name}",
                   f"external_ids:hostname={host.name}", f"external_ids:ovn-remote=unix:{self.dir}/ovnsb_db.sock",
                   f"external_ids:ovn-encap-type={self.encap}", f"external_ids:ovn-encap-ip={host.ip}")
        d = host.dir
        # OVN_RUNDIR/OVS_RUNDIR: ovn-controller finds br-int's OpenFlow socket in the host's folder.
        host.sh.run(["ovn-controller", host.db, f"--pidfile={d}/ovn-controller.pid", f"--log-file={d}/ovn-controller.log",
                     "--detach", "--no-chdir"], netns=host.name,
                    env={**host.ovs_env, "OVN_RUNDIR": str(d), "OVN_LOGDIR": str(d), "OVN_DBDIR": str(d)})
        self.add_port(host)

    def add_port(self, host: Host) -> None:
        port, mac = f"lp-{host.name}", f"0a:00:00:00:00:{host.name[-1]:0>2}"
        self.nbctl("lsp-add", SWITCH, port, "--", "lsp-set-addresses", port, f"{mac} {host.overlay_ip}")
        host.vsctl("add-port", INTEGRATION_BRIDGE, port, "--", "set", "interface", port, "type=internal",
                   f"external_ids:iface-id={port}")
        # No IPv6 on the port (as on br-ipsec in hosts.py): nothing enters the overlay but the ping.
        host.sh.run(["sysctl", "-qw", f"net.ipv6.conf.{port}.disable_ipv6=1"], netns=host.name)
        for args in (["address", mac], ["up"]):
            host.sh.run(["ip", "link", "set", port, *args], netns=host.name)
        host.sh.run(["ip", "addr", "add", f"{host.overlay_ip}/24", "dev", port], netns=host.name)

    def leave(self, host: Host) -> None:
        stop_pidfile(host.dir / "ovn-controller.pid")

    def stop(self) -> None:
        for name in ("ovn-northd", "ovnsb_db", "ovnnb_db"):
            stop_pidfile(self.dir / f"{name}.pid")
