"""The two simulated hypervisors of a scenario: network namespaces joined by a veth underlay,
each with its own ovsdb-server and ovs-vswitchd on the kernel datapath.

Every daemon of a host keeps its sockets, pidfiles and logs in the host's directory, so the
two hosts never share state and a failed scenario's files can be copied out as they are.
"""

from dataclasses import dataclass
from pathlib import Path

from proc import Shell, stop_pidfile, wait_for
from scenario import OVERLAY, THIRD, UNDERLAYS, Scenario

OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
BRIDGE = "br-ipsec"
TUNNEL_PORT = "tun"
SWITCH = "lsw"   # the namespace of the switch when there are three hosts


@dataclass
class Host:
    name: str            # also the network namespace's name
    dev: str             # its end of the underlay veth
    ip: str              # underlay address
    prefix: int
    overlay_ip: str      # address on br-ipsec
    dir: Path
    sh: Shell

    @property
    def db(self) -> str:
        return f"unix:{self.dir}/db.sock"

    @property
    def ovs_env(self) -> dict:
        # Keeps OVS tools from looking at /var/run/openvswitch of the (absent) system instance.
        return {"OVS_RUNDIR": str(self.dir), "OVS_LOGDIR": str(self.dir), "OVS_DBDIR": str(self.dir)}

    def vsctl(self, *args, **kwargs):
        return self.sh.run(["ovs-vsctl", "--timeout=60", f"--db={self.db}", *args], **kwargs)

    def appctl(self, target: str, *args, **kwargs):
        return self.sh.run(["ovs-appctl", "-t", self.dir / f"{target}.ctl", *args], env=self.ovs_env, **kwargs)

    # --- Open vSwitch ---------------------------------------------------------------------

    def start_ovs(self) -> None:
        d = self.dir
        self.sh.run(["ovsdb-tool", "create", d / "conf.db", OVS_SCHEMA])
        self.sh.run(["ovsdb-server", d / "conf.db", f"--remote=punix:{d}/db.sock",
                     f"--pidfile={d}/ovsdb-server.pid", f"--unixctl={d}/ovsdb-server.ctl",
                     f"--log-file={d}/ovsdb-server.log", "--detach", "--no-chdir"],
                    netns=self.name, env=self.ovs_env)
        self.vsctl("--no-wait", "init")
        # ovs-vswitchd runs inside the namespace: the kernel datapath is per network namespace.
        self.sh.run(["ovs-vswitchd", self.db, f"--pidfile={d}/ovs-vswitchd.pid",
                     f"--unixctl={d}/ovs-vswitchd.ctl", f"--log-file={d}/ovs-vswitchd.log",
                     "--detach", "--no-chdir"], netns=self.name, env=self.ovs_env)

    def stop_ovs(self) -> None:
        # exit --cleanup removes the datapath and its tunnel vports instead of leaving them behind.
        self.appctl("ovs-vswitchd", "exit", "--cleanup", check=False, timeout=20)
        stop_pidfile(self.dir / "ovs-vswitchd.pid")
        stop_pidfile(self.dir / "ovsdb-server.pid")

    # --- what an operator types -----------------------------------------------------------

    def add_bridge(self) -> None:
        self.vsctl("add-br", BRIDGE, "--", "set", "bridge", BRIDGE, "datapath_type=system")
        # No IPv6 on the overlay: router solicitations and DAD would send traffic into the tunnel
        # before the peer is configured, and the result would depend on that timing. The only
        # overlay traffic is the scenario's own ping.
        self.sh.run(["sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.disable_ipv6=1"], netns=self.name)
        self.sh.run(["ip", "addr", "add", f"{self.overlay_ip}/{OVERLAY[2]}", "dev", BRIDGE], netns=self.name)
        self.sh.run(["ip", "link", "set", BRIDGE, "up"], netns=self.name)

    def add_tunnel(self, scenario: Scenario, peer: "Host", auth_options: dict, name: str = TUNNEL_PORT) -> None:
        # Without local_ip (upstream's "defaultroute" cases) the IKE daemon picks the address of
        # the route to the peer: LibreSwan's %defaultroute, strongSwan's %any.
        local = {"local_ip": self.ip} if scenario.local_ip else {}
        options = {**local, "remote_ip": peer.ip, **auth_options, **scenario.options}
        self.vsctl("add-port", BRIDGE, name, "--", "set", "interface", name,
                   f"type={scenario.tunnel}", *[f"options:{k}={v}" for k, v in options.items()])

    # --- diagnostics ------------------------------------------------------------------------

    def snapshot(self) -> str:
        """State worth reading after a failure: OVS config, datapath ports, xfrm SAs and policies."""
        parts = []
        for title, argv, kw in (
            ("ovs-vsctl show", ["ovs-vsctl", f"--db={self.db}", "--timeout=10", "show"], {}),
            ("open_vswitch table (other_config: certificates)",
             ["ovs-vsctl", f"--db={self.db}", "--timeout=10", "list", "open_vswitch"], {}),
            ("interface table", ["ovs-vsctl", f"--db={self.db}", "--timeout=10", "list", "interface"], {}),
            ("dpctl/show", ["ovs-appctl", "-t", self.dir / "ovs-vswitchd.ctl", "dpctl/show"], {}),
            ("ip -s xfrm state", ["ip", "-s", "xfrm", "state"], {"netns": self.name}),
            ("ip xfrm policy", ["ip", "xfrm", "policy"], {"netns": self.name}),
            ("ip -br addr", ["ip", "-br", "addr"], {"netns": self.name}),
        ):
            try:
                cp = self.sh.run(argv, check=False, timeout=15, **kw)
                parts.append(f"=== {title}\n{cp.stdout}{cp.stderr}")
            except Exception as e:   # diagnostics must never hide the real failure
                parts.append(f"=== {title}\n{e}")
        return "\n".join(parts)


class Topology:
    """Namespaces h1 and h2 and the veth pair u1 <-> u2 between them. With a third host (scenario
    third_host), h3 too, and the three on one switch (a bridge in namespace `lsw`, as upstream's
    br0), h2's end still u2; h3 is `third`, outside `hosts`, until it joins (guest/third.py)."""

    def __init__(self, scenario: Scenario, workdir: Path, sh: Shell):
        ip1, ip2, prefix = UNDERLAYS[scenario.underlay]
        self.family = scenario.underlay
        self.default_routes = not scenario.local_ip
        self.hosts = [
            Host("h1", "u1", ip1, prefix, OVERLAY[0], workdir / "h1", sh),
            Host("h2", "u2", ip2, prefix, OVERLAY[1], workdir / "h2", sh),
        ]
        self.third = (Host("h3", "u3", THIRD[scenario.underlay], prefix, THIRD["overlay"], workdir / "h3", sh)
                      if scenario.third_host else None)
        self.sh = sh

    @property
    def all_hosts(self) -> list:
        return self.hosts + ([self.third] if self.third else [])

    def up(self) -> None:
        h1, h2 = self.hosts
        for h in self.all_hosts:
            h.dir.mkdir(parents=True, exist_ok=True)
            self.sh.run(["ip", "netns", "add", h.name])
            self.sh.run(["ip", "link", "set", "lo", "up"], netns=h.name)
        if self.third:
            self.sh.run(["ip", "netns", "add", SWITCH])
            self.sh.run(["ip", "link", "add", "br0", "type", "bridge"], netns=SWITCH)
            self.sh.run(["ip", "link", "set", "br0", "up"], netns=SWITCH)
            for index, h in enumerate(self.all_hosts, start=1):
                self.sh.run(["ip", "link", "add", h.dev, "netns", h.name, "type", "veth",
                             "peer", "name", f"s{index}", "netns", SWITCH])
                self.sh.run(["ip", "link", "set", f"s{index}", "master", "br0", "up"], netns=SWITCH)
        else:
            self.sh.run(["ip", "link", "add", h1.dev, "netns", h1.name, "type", "veth",
                         "peer", "name", h2.dev, "netns", h2.name])
        for h in self.all_hosts:
            extra = ["nodad"] if self.family == "ipv6" else []
            self.sh.run(["ip", "addr", "add", f"{h.ip}/{h.prefix}", "dev", h.dev, *extra], netns=h.name)
            self.sh.run(["ip", "link", "set", h.dev, "up"], netns=h.name)
        if self.default_routes:
            # As upstream's test harness: each node's default route goes through its peer, which is
            # what %defaultroute (LibreSwan) and %any (strongSwan) resolve a tunnel without local_ip by.
            for h, peer in ((h1, h2), (h2, h1)):
                self.sh.run(["ip", "route", "add", "default", "via", peer.ip, "dev", h.dev], netns=h.name)
        ok = wait_for(lambda: self.sh.run(["ping", "-c1", "-W1", h2.ip], netns=h1.name,
                                          check=False).returncode == 0, timeout=10)
        if not ok:
            raise RuntimeError(f"underlay {h1.ip} -> {h2.ip} does not answer ping")

    def down(self) -> None:
        for h in self.all_hosts:
            self.sh.run(["ip", "netns", "del", h.name], check=False)
        if self.third:
            self.sh.run(["ip", "netns", "del", SWITCH], check=False)
