"""Test hosts on one switch: network namespaces joined by veths to a bridge, each host composed of
an ovsdb-server, an IKE daemon (charon or pluto) and our monitor (see the fixtures beside)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ovs_ipsec.runner import run

from .charon import Charon
from .monitor import Monitor
from .ovsdb import Ovsdb
from .pluto import Pluto
from .upstream import UpstreamLibreswan, UpstreamStrongswan, upstream_monitor


class Host:
    """One simulated hypervisor in the namespace `name`."""

    def __init__(self, name: str, workdir: Path, addresses: tuple[str, ...], device: str,
                 extra_charon_conf: str = "", ike_daemon: str = "strongswan") -> None:
        self.name = name
        self.workdir = workdir
        self.addresses = addresses
        self.device = device
        self.ike_daemon = ike_daemon  # "strongswan" (charon) or "libreswan" (pluto)
        self.ovsdb = Ovsdb(workdir)
        self.charon = Charon(name, workdir, self.netns(), extra_charon_conf)
        self.pluto = Pluto(name, workdir, self.netns())
        self.monitor = Monitor(name, workdir, self.netns(), self.ovsdb.remote, self.ovsdb.env)
        self.upstream: UpstreamStrongswan | UpstreamLibreswan | None = None  # Debian's monitor, instead of ours

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def db(self) -> str:
        return self.ovsdb.remote

    @property
    def env(self) -> dict[str, str]:
        return self.ovsdb.env

    def netns(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def add_default_route(self, via: str) -> None:
        """A default route through `via` (a neighbour on the switch), as upstream's test harness gives
        every node: what LibreSwan's %defaultroute and strongSwan's %any resolve a tunnel without
        local_ip through."""
        run(["ip", "-n", self.name, *(["-6"] if ":" in via else []), "route", "add", "default", "via", via,
             "dev", self.device])

    # -- the daemons, by their fixtures --------------------------------------------------------

    def start_ovsdb(self) -> None:
        self.ovsdb.start()

    def stop_ovsdb(self) -> None:
        self.ovsdb.stop()

    def vsctl(self, *args: str) -> str:
        return self.ovsdb.vsctl(*args)

    def start_ike_daemon(self) -> None:
        self.pluto.start() if self.ike_daemon == "libreswan" else self.charon.start()

    def stop_ike_daemon(self, hard: bool = False) -> None:
        self.pluto.stop(hard) if self.ike_daemon == "libreswan" else self.charon.stop(hard)

    @property
    def charon_pid(self) -> int | None:
        return self.charon.pid

    @property
    def pluto_pid(self) -> int | None:
        return self.pluto.pid

    def start_charon(self) -> None:
        self.charon.start()

    def stop_charon(self, hard: bool = False) -> None:
        self.charon.stop(hard)

    def vici(self):
        return self.charon.session()

    @property
    def vici_path(self) -> str:
        return self.charon.vici_path

    def start_pluto(self) -> None:
        self.pluto.start()

    def stop_pluto(self, hard: bool = False) -> None:
        self.pluto.stop(hard)

    @property
    def lsw_root(self) -> Path:
        return self.pluto.root

    @property
    def pluto_ctl(self) -> str:
        return self.pluto.ctl

    def ipsec(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        return self.pluto.ipsec(*args, timeout=timeout, check=check)

    def whack(self, *args: str, check: bool = True) -> str:
        return self.pluto.whack(*args, check=check)

    def daemon_flags(self) -> list[str]:
        return self.pluto.monitor_flags() if self.ike_daemon == "libreswan" else [f"--vici-uri=unix://{self.vici_path}"]

    def start_monitor(self, *extra: str) -> None:
        self.monitor.start(self.daemon_flags(), *extra)

    def stop_monitor(self, cleanup: bool = False, hard: bool = False) -> None:
        self.monitor.stop(cleanup, hard)

    def terminate_monitor(self) -> None:
        """SIGTERM, as `kill <pid>` (upstream's tests stop a monitor so): no unixctl exit, no cleanup."""
        self.monitor.terminate()

    def monitor_pid(self) -> int | None:
        return self.monitor.pid()

    # -- upstream's monitor (Debian's ovs-monitor-ipsec), for mixed clusters ---------------------

    def start_upstream(self, extra_charon_conf: str = "",
                       trust_ca: Path | None = None) -> UpstreamStrongswan | UpstreamLibreswan:
        """Debian's ovs-monitor-ipsec on this host instead of ours (testsupport/upstream.py): with
        strongSwan it starts its own starter and charon; with LibreSwan it drives this host's pluto
        (started here if it is not running). `trust_ca`: the CA certificate an operator copies into
        /etc/ipsec.d/cacerts for upstream's strongSwan mode (as the OVS IPsec tutorial says)."""
        upstream = upstream_monitor(self, extra_charon_conf)
        self.upstream = upstream
        if isinstance(upstream, UpstreamLibreswan):
            if self.pluto.pid is None:
                self.pluto.start()
        elif trust_ca is not None:
            upstream.trust_ca(trust_ca)
        upstream.start()
        return upstream

    def stop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.stop()
            self.upstream = None

    @property
    def unixctl(self) -> str:
        return self.monitor.unixctl

    def appctl(self, *args: str, timeout: float = 30) -> str:
        return self.monitor.appctl(*args, timeout=timeout)

    def status(self) -> dict:
        return self.monitor.status()

    def tunnel(self, name: str) -> dict | None:
        return self.monitor.tunnel(name)

    def wait_state(self, name: str, state: str | tuple[str, ...], timeout: float = 30) -> dict:
        return self.monitor.wait_state(name, state, timeout)

    def wait_ike_up(self, name: str, timeout: float = 30) -> dict:
        return self.monitor.wait_ike_up(name, timeout)

    def log_text(self) -> str:
        return self.monitor.log_text()

    def stop(self) -> None:
        for stop in (lambda: self.monitor.stop(hard=True), self.stop_upstream, self.charon.stop, self.pluto.stop,
                     self.ovsdb.stop):
            try:
                stop()
            except Exception:  # keep tearing down the rest
                pass


class Sandbox:
    """Hosts on one L2 segment: a bridge in its own namespace, one veth per host."""

    def __init__(self, prefix: str, workdir: Path, keep_files: bool = False) -> None:
        self.prefix = prefix
        self.workdir = workdir
        self.keep_files = keep_files
        self.hosts: list[Host] = []
        self._switch = f"{prefix}sw"
        self.workdir.mkdir(parents=True, exist_ok=True)
        run(["ip", "netns", "add", self._switch])
        run(["ip", "-n", self._switch, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self._switch, "link", "set", "br0", "up"])

    def add_host(self, name: str, *addresses: str, extra_charon_conf: str = "", ike_daemon: str = "strongswan") -> Host:
        """A namespace `<prefix><name>` wired to the switch; addresses are CIDRs (v4 or v6)."""
        netns = f"{self.prefix}{name}"
        index = len(self.hosts)
        device, peer = f"{self.prefix}h{index}", f"{self.prefix}p{index}"
        run(["ip", "netns", "add", netns])
        run(["ip", "link", "add", device, "netns", netns, "type", "veth", "peer", "name", peer,
             "netns", self._switch])
        run(["ip", "-n", self._switch, "link", "set", peer, "master", "br0", "up"])
        for address in addresses:
            run(["ip", "-n", netns, "addr", "add", address, "dev", device, *(["nodad"] if ":" in address else [])])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        run(["ip", "-n", netns, "link", "set", device, "up"])
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        host = Host(netns, workdir, tuple(a.split("/")[0] for a in addresses), device,
                    extra_charon_conf=extra_charon_conf, ike_daemon=ike_daemon)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.stop()
        for netns in [host.name for host in self.hosts] + [self._switch]:
            subprocess.run(["ip", "netns", "del", netns], stderr=subprocess.DEVNULL, timeout=30)
        if not self.keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
