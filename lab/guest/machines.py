"""Lab hosts that boot systemd as PID 1: systemd-nspawn machines inside the lab VM.

Each machine boots Debian's systemd over an overlay of one of the image's machine trees
(/srv/machines/upstream: Debian's openvswitch-ipsec; /srv/machines/ovs-ipsec: our .deb installed
with apt), so Debian's own units run it: ovsdb-server, ovs-vswitchd, strongswan(-starter),
openvswitch-ipsec or ovs-ipsec. Its disk (the overlay's upper folder) outlives a reboot.

The network is the machine's own network namespace, made here and handed to nspawn: an underlay
veth `eth0` (10.0.0.N/24) whose other end sits on the bridge `wire` in the VM's namespace, where
the capture runs. A *power cycle* (`reboot()`) stops the machine, deletes its namespace (every XFRM
state and policy, the OVS datapath, the veth: what a power-off loses) and makes a fresh one before
booting again; the bridge and the capture on it stay up, so the peer's traffic during the reboot
is on the wire too.

Commands run inside a machine with nsenter into its PID 1's namespaces (no machined in the VM).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from proc import Shell, alive, stop_pid, wait_for

TREES = Path("/srv/machines")
STATE = Path("/var/lib/lab-machines")
BRIDGE = "wire"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def prepare_vm(sh: Shell) -> None:
    """Once per boot: cgroup2 for nspawn (the VM's init is not systemd) and the wire bridge."""
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        sh.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"])
    if sh.run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
        sh.run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        sh.run(["ip", "link", "set", BRIDGE, "up"])
        # No IPv6 noise on the wire: the capture counts tunnel packets only anyway.
        sh.run(["sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.disable_ipv6=1"])


class Machine:
    def __init__(self, name: str, index: int, tree: str, sh: Shell, logdir: Path):
        self.name, self.index, self.tree, self.sh = name, index, tree, sh
        self.ip = f"10.0.0.{index}"
        self.overlay_ip = f"192.0.0.{index}"
        self.state = STATE / name
        self.root = self.state / "root"
        self.logdir = logdir
        self.proc: subprocess.Popen | None = None
        self.boots = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self) -> None:
        """A fresh disk: an empty upper folder over the tree."""
        for sub in ("upper", "work", "root"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.sh.run(["mount", "-t", "overlay", f"lab-{self.name}", "-o",
                     f"lowerdir={TREES / self.tree},upperdir={self.state}/upper,workdir={self.state}/work",
                     self.root])

    def power_on(self) -> float:
        """Fresh network namespace and wire, then boot; returns the monotonic time of power-on."""
        self._plug()
        self.boots += 1
        log = self.logdir / f"{self.name}-console-{self.boots}.txt"
        t = time.monotonic()
        # Each machine in a cgroup of its own (the VM's init is not systemd; nspawn --keep-unit then
        # makes its payload/supervisor groups under it), and no D-Bus needed (--keep-unit,
        # --register=no).
        cgroup = f"/sys/fs/cgroup/lab-{self.name}"
        self.proc = self.sh.spawn(
            ["sh", "-c", f'mkdir -p {cgroup} && echo $$ > {cgroup}/cgroup.procs && exec "$@"', "nspawn",
             "systemd-nspawn", "--quiet", "--boot", "--keep-unit", f"--directory={self.root}", f"--machine={self.name}",
             f"--hostname={self.name}", f"--network-namespace-path=/run/netns/{self.name}", "--register=no",
             "--console=passive", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
             "--capability=CAP_NET_ADMIN", "--private-users=no"],
            log=log)
        return t

    def wait_booted(self, timeout: float = 180) -> str:
        """Until systemd says the boot is over: running or degraded (then the failed units are logged)."""
        state = "?"

        def done() -> bool:
            nonlocal state
            if self.leader() is None:
                return False
            cp = self.run("systemctl", "is-system-running", check=False, timeout=30, quiet=True)
            state = cp.stdout.strip()
            return state in ("running", "degraded")

        if not wait_for(done, timeout, interval=1.0):
            raise RuntimeError(f"{self.name} did not finish booting in {timeout:g} s (state {state})")
        if state == "degraded":
            self.run("systemctl", "--failed", "--no-pager", check=False)
        return state

    def shutdown(self) -> None:
        """A clean power-off (systemctl poweroff inside), then the namespace goes."""
        if self.proc is not None and alive(self.proc.pid):
            self.run("systemctl", "poweroff", "--no-block", check=False, timeout=30)
            if not wait_for(lambda: self.proc.poll() is not None, 90):
                stop_pid(self.proc.pid, grace=10)
            self.proc.wait(timeout=10)
        self.proc = None
        self._unplug()

    def reboot(self) -> float:
        """`systemctl reboot`, and the power cycle a reboot is: a new namespace, then boot."""
        self.shutdown()
        return self.power_on()

    def destroy(self) -> None:
        if self.proc is not None and alive(self.proc.pid):
            stop_pid(self.proc.pid, grace=20)
        self.proc = None
        self._unplug()
        self.sh.run(["umount", self.root], check=False)

    def _plug(self) -> None:
        self.sh.run(["ip", "netns", "add", self.name])
        self.sh.run(["ip", "link", "add", "eth0", "netns", self.name, "type", "veth", "peer", "name",
                     f"w{self.name}"])
        self.sh.run(["ip", "link", "set", f"w{self.name}", "master", BRIDGE, "up"])
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{self.ip}/24", "dev", "eth0"],
                     ["ip", "link", "set", "eth0", "up"]):
            self.sh.run(argv, netns=self.name)

    def _unplug(self) -> None:
        self.sh.run(["ip", "link", "del", f"w{self.name}"], check=False)
        self.sh.run(["ip", "netns", "del", self.name], check=False)

    # -- inside ------------------------------------------------------------------------------

    def leader(self) -> int | None:
        """The machine's PID 1 as the VM sees it: a descendant of our nspawn whose pid in its own
        namespace is 1 (nspawn is a child subreaper: the container's init ends up its child)."""
        if self.proc is None or not alive(self.proc.pid):
            return None
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        for pid in parents:
            ancestor, hops = parents.get(pid), 0
            while ancestor not in (None, 0, 1, self.proc.pid) and hops < 5:
                ancestor, hops = parents.get(ancestor), hops + 1
            if ancestor != self.proc.pid:
                continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) > 1 and nspid[-1] == "1":
                return pid
        return None

    def run(self, *argv, check: bool = True, timeout: float = 60, quiet: bool = False,
            log: Path | None = None) -> subprocess.CompletedProcess:
        leader = self.leader()
        if leader is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.sh.run(["nsenter", f"--target={leader}", "--mount", "--uts", "--ipc", "--net", "--pid",
                            "--cgroup", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", *argv],
                           check=check, timeout=timeout, quiet=quiet, log=log)

    def vsctl(self, *args, **kwargs):
        return self.run("ovs-vsctl", "--timeout=60", *args, **kwargs)

    def copy_in(self, source: Path, target: str, mode: int = 0o644) -> None:
        """A file into the machine's disk (the overlay), as an operator's scp would."""
        path = self.root / target.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.read_bytes())
        path.chmod(mode)

    def read(self, target: str) -> str:
        path = self.root / target.lstrip("/")
        return path.read_text(errors="replace") if path.exists() else ""
