"""Test support for userspace ESP: hosts with ovs-vswitchd on the netdev datapath and our ESP bump.

Each host is a namespace from `testsupport.sandbox.Sandbox` (underlay veth on the sandbox's switch,
its own ovsdb-server), plus, in that namespace:

    br-int (netdev, overlay address on its internal port) --tunnel-->  br-phy (netdev, local_ip,
    OVS route to the peer) --uplink port `esp-ovs`-- veth --`esp-gw`--> ovs-ipsec userspace-esp
    --raw IP sockets--> the underlay device

Every process is started here and stopped by PID; the sandbox deletes the namespaces.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ovs_ipsec.runner import run
from testsupport.procs import kill_pid, read_pid, socket_answers, wait_for
from testsupport.sandbox import Host

UPLINK_OVS = "esp-ovs"
UPLINK_BUMP = "esp-gw"


def new_key(bits: int = 128) -> str:
    """key||salt in ip xfrm's format."""
    return "0x" + secrets.token_hex(bits // 8 + 4)


@dataclass
class NetdevHost:
    host: Host
    overlay: dict = field(default_factory=dict)  # bridge -> overlay address
    started: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def d(self):
        return self.host.workdir

    def ns(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        return run(self.host.netns(*argv), timeout=timeout, check=check).stdout

    def appctl(self, target: str, *args: str, check: bool = True) -> str:
        return run(["ovs-appctl", "-t", str(self.d / f"{target}.ctl"), *args], timeout=30, check=check).stdout

    def vsctl(self, *args: str) -> str:
        return run(["ovs-vsctl", f"--db={self.host.db}", "--timeout=20", *args], timeout=30).stdout

    # -- OVS -----------------------------------------------------------------------------------

    def start_ovs(self) -> None:
        self.host.start_ovsdb()
        self.host.vsctl("--if-exists", "del-br", "br-ipsec")  # the sandbox's kernel-datapath bridge
        d = self.d
        subprocess.run(self.host.netns("ovs-vswitchd", self.host.db, f"--pidfile={d}/ovs-vswitchd.pid",
                                       f"--unixctl={d}/ovs-vswitchd.ctl", f"--log-file={d}/ovs-vswitchd.log",
                                       "--detach", "--no-chdir", "-vconsole:off"),
                       env=self.host.env, check=True, timeout=60)
        wait_for(lambda: socket_answers(str(d / "ovs-vswitchd.ctl")), 20, what="ovs-vswitchd")

    def setup_underlay_bridge(self, peers: list[str]) -> None:
        """br-phy holds local_ip (no prefix route: the kernel routes ESP through the underlay
        device); OVS routes tunnels to each peer through br-phy, whose uplink is our veth."""
        self.ns("ip", "link", "add", UPLINK_OVS, "type", "veth", "peer", "name", UPLINK_BUMP)
        for dev in (UPLINK_OVS, UPLINK_BUMP):
            self.ns("ip", "link", "set", dev, "up")
        self.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev")
        self.vsctl("add-port", "br-phy", UPLINK_OVS)
        for address in self.host.addresses:
            prefix = "64" if ":" in address else "24"
            self.ns("ip", "addr", "add", f"{address}/{prefix}", "dev", "br-phy", "noprefixroute",
                    *(["nodad"] if ":" in address else []))
        self.ns("ip", "link", "set", "br-phy", "up")
        for peer in peers:
            self.appctl("ovs-vswitchd", "ovs/route/add", f"{peer}/{128 if ':' in peer else 32}", "br-phy")

    def setup_plain_underlay(self, peers: list[str]) -> None:
        """br-phy owns the underlay device itself, as an OVS-DPDK host's bridge owns its NIC: tunnel
        packets leave through OVS's own port, with no ESP bump (and no kernel IP stack) in the way."""
        device = self.host.device
        self.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev")
        self.vsctl("add-port", "br-phy", device)
        self.ns("ip", "addr", "flush", "dev", device)
        for address in self.host.addresses:
            self.ns("ip", "addr", "add", f"{address}/{64 if ':' in address else 24}", "dev", "br-phy",
                    *(["nodad"] if ":" in address else []))
        self.ns("ip", "link", "set", "br-phy", "up")
        for peer in peers:
            self.appctl("ovs-vswitchd", "ovs/route/add", f"{peer}/{128 if ':' in peer else 32}", "br-phy")

    def add_overlay_bridge(self, bridge: str, address: str, mtu: int | None = None) -> None:
        self.vsctl("add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev")
        self.ns("sysctl", "-qw", f"net.ipv6.conf.{bridge}.disable_ipv6=1")
        self.ns("ip", "addr", "add", address, "dev", bridge)
        if mtu:
            self.ns("ip", "link", "set", bridge, "mtu", str(mtu))
        self.ns("ip", "link", "set", bridge, "up")
        self.overlay[bridge] = address.split("/")[0]

    def add_tunnel(self, bridge: str, name: str, kind: str, local: str, remote: str, **options: str) -> None:
        settings = [f"options:{k}={v}" for k, v in {"local_ip": local, "remote_ip": remote, **options}.items()]
        self.vsctl("add-port", bridge, name, "--", "set", "interface", name, f"type={kind}", *settings)

    # -- the ESP bump --------------------------------------------------------------------------

    @property
    def esp_ctl(self) -> str:
        return str(self.d / "esp.ctl")

    def start_esp(self, *extra: str) -> None:
        d = self.d
        argv = self.host.netns(sys.executable, "-m", "ovs_ipsec.cli.main", "userspace-esp", self.host.db,
                               "--uplink", UPLINK_BUMP, f"--state-dir={d}/esp-state", f"--unixctl={self.esp_ctl}",
                               f"--pidfile={d}/esp.pid", f"--log-file={d}/esp.log", "--detach", "--no-chdir",
                               "-vconsole:off", "-vfile:dbg", *extra)
        subprocess.run(argv, env=self.host.env, check=True, timeout=60)
        wait_for(lambda: socket_answers(self.esp_ctl), 20, what=f"userspace-esp on {self.name}")

    def esp_pid(self) -> int | None:
        return read_pid(self.d / "esp.pid")

    def stop_esp(self, hard: bool = False) -> None:
        pid = self.esp_pid()
        if pid is not None:
            kill_pid(pid, signal.SIGKILL if hard else signal.SIGTERM)
        (self.d / "esp.pid").unlink(missing_ok=True)

    def esp_status(self) -> dict:
        return json.loads(run(["ovs-appctl", "-t", self.esp_ctl, "esp/show", "--json"], timeout=30).stdout)

    def esp_show_text(self) -> str:
        return run(["ovs-appctl", "-t", self.esp_ctl, "esp/show"], timeout=30).stdout

    def esp_tunnel(self, name: str) -> dict:
        return next(t for t in self.esp_status()["tunnels"] if t["name"] == name)

    def esp_log(self) -> str:
        path = self.d / "esp.log"
        return path.read_text() if path.exists() else ""

    def wait_tunnel(self, name: str, state: str = "active", timeout: float = 20) -> dict:
        def ready():
            try:
                tunnel = self.esp_tunnel(name)
            except StopIteration:
                return None
            return tunnel if tunnel["state"] == state else None
        return wait_for(ready, timeout, what=f"tunnel {name} {state} on {self.name}")

    def ping(self, address: str, count: int = 3, size: int | None = None, dont_fragment: bool = False,
             interval: float = 0.2, timeout: float = 2) -> tuple[int, int, str]:
        argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(timeout)]
        if size is not None:
            argv += ["-s", str(size)]
        if dont_fragment:
            argv += ["-M", "do"]
        completed = subprocess.run(self.host.netns(*argv, address), capture_output=True, text=True, timeout=60)
        out = completed.stdout + completed.stderr
        import re

        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        return (int(match[1]), int(match[2]), out) if match else (0, 0, out)

    def stop(self) -> None:
        for stop in (self.stop_esp, self._stop_vswitchd, self.host.stop):
            try:
                stop()
            except Exception:  # keep tearing down
                pass
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(10)

    def _stop_vswitchd(self) -> None:
        pid = read_pid(self.d / "ovs-vswitchd.pid")
        if pid is not None:
            kill_pid(pid, signal.SIGTERM)


class Capture:
    """tcpdump on a host's underlay device (everything), stopped by PID. --immediate-mode: without it
    packets of the last block timeout (up to 1 s) may never be written when tcpdump is stopped."""

    def __init__(self, host: NetdevHost, path) -> None:
        self.path = str(path)
        self.process = subprocess.Popen(host.host.netns("tcpdump", "-i", host.host.device, "-nn", "-U",
                                                        "--immediate-mode", "-Z", "root", "-w", self.path),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        host.started.append(self.process)
        wait_for(lambda: "listening on" in self.process.stderr.readline(), 10, what="tcpdump to listen")

    def stop(self) -> None:
        time.sleep(0.5)  # packets in flight
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.communicate(timeout=10)

    def count(self, expression: str) -> int:
        out = subprocess.run(["tcpdump", "-nn", "-r", self.path, expression], capture_output=True, text=True,
                             check=True).stdout
        return len(out.splitlines())
