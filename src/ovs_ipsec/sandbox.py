"""Private test hosts: network namespaces on one switch, each with its own ovsdb-server, charon and
monitor. Used by the functional tests, `make demo` and the benchmark, never by the daemon.

Everything started here is stopped by PID and every namespace is deleted by name on close, so
nothing leaks into the machine, whatever the outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .runner import run

CHARON = "/usr/sbin/charon-systemd"
# LibreSwan conflicts with strongSwan as a Debian package: scripts/setup-libreswan.sh extracts its
# .deb here, and pluto runs from there in a private mount namespace (see Host.start_pluto).
LIBRESWAN_ROOT = os.path.join(os.environ.get("LIBRESWAN_ROOT", "/var/cache/ovs-ipsec/libreswan"), "root")
CHARON_PLUGINS = ("random nonce openssl pem pkcs1 pkcs8 x509 revocation constraints pubkey aes sha1 sha2 "
                  "hmac gcm kdf curve25519 kernel-netlink socket-default vici")


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll until predicate() is truthy; return its value or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Host:
    name: str  # also the network namespace's name
    workdir: Path
    addresses: tuple[str, ...]
    device: str
    charon_pid: int | None = None
    extra_charon_conf: str = ""
    ike_daemon: str = "strongswan"  # or "libreswan": pluto instead of charon
    pluto_pid: int | None = None
    started: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def db(self) -> str:
        return f"unix:{self.workdir}/db.sock"

    @property
    def vici_path(self) -> str:
        return f"{self.workdir}/charon.vici"

    @property
    def unixctl(self) -> str:
        return f"{self.workdir}/ovs-monitor-ipsec.ctl"

    @property
    def env(self) -> dict[str, str]:
        d = str(self.workdir)
        return {**os.environ, "OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d, "OVS_SYSCONFDIR": d}

    def netns(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    # -- OVSDB -----------------------------------------------------------------------------

    def start_ovsdb(self) -> None:
        d = self.workdir
        schema = "/usr/share/openvswitch/vswitch.ovsschema"
        if not (d / "conf.db").exists():
            run(["ovsdb-tool", "create", f"{d}/conf.db", schema])
        subprocess.run(["ovsdb-server", f"{d}/conf.db", f"--remote=punix:{d}/db.sock",
                        f"--pidfile={d}/ovsdb-server.pid", f"--unixctl={d}/ovsdb-server.ctl",
                        "--detach", "--no-chdir", f"--log-file={d}/ovsdb-server.log", "-vconsole:off"],
                       env=self.env, check=True, timeout=30, stderr=subprocess.DEVNULL)  # its log has it all
        self.vsctl("init")
        self.vsctl("--may-exist", "add-br", "br-ipsec")

    def stop_ovsdb(self) -> None:
        _kill_pidfile(self.workdir / "ovsdb-server.pid")

    def vsctl(self, *args: str) -> str:
        # --no-wait: no ovs-vswitchd runs here, and ovs-vsctl would wait for it forever.
        return run(["ovs-vsctl", f"--db={self.db}", "--no-wait", "--timeout=10", *args], timeout=20).stdout

    # -- charon ----------------------------------------------------------------------------

    def start_charon(self) -> None:
        d = self.workdir
        conf = d / "strongswan.conf"
        conf.write_text(f"""charon-systemd {{
  load_modular = no
  load = {CHARON_PLUGINS}
  install_routes = no
  {self.extra_charon_conf}
  plugins {{
    vici {{ socket = unix://{self.vici_path} }}
    kernel-netlink {{ set_proto_port_transport_sa = yes }}
  }}
  journal {{ default = -1 }}
  filelog {{ sandbox {{ path = {d}/charon.log
                       time_format = %T
                       flush_line = yes
                       append = yes
                       default = 1 }} }}
}}
""")
        log = open(d / "charon.out", "ab")
        process = subprocess.Popen(self.netns(CHARON), env={**os.environ, "STRONGSWAN_CONF": str(conf)},
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.charon_pid = process.pid
        wait_for(lambda: _socket_answers(self.vici_path), 20, what=f"charon VICI socket on {self.name}")

    def stop_charon(self, hard: bool = False) -> None:
        if self.charon_pid is not None:
            _kill_pid(self.charon_pid, signal.SIGKILL if hard else signal.SIGTERM)
            self.charon_pid = None
            try:
                os.unlink(self.vici_path)
            except FileNotFoundError:
                pass

    def vici(self):
        import vici

        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(self.vici_path)
        return vici.Session(sock)

    # -- pluto (LibreSwan) -----------------------------------------------------------------
    # The monitor sees a root prefix <workdir>/root holding what a LibreSwan host has: an `ipsec`
    # command (a wrapper around the extracted one), /etc/ipsec.conf and ipsec.secrets that include
    # /etc/ipsec.d/*.conf|*.secrets (as Debian's do), the NSS database in /nss and pluto's
    # control socket in /run.

    @property
    def lsw_root(self) -> Path:
        return self.workdir / "root"

    @property
    def pluto_ctl(self) -> str:
        return f"{self.lsw_root}/run/pluto.ctl"

    def ipsec(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        return run([f"{self.lsw_root}/usr/sbin/ipsec", *args], timeout=timeout, check=check).stdout

    def whack(self, *args: str, check: bool = True) -> str:
        return self.ipsec("whack", "--ctlsocket", self.pluto_ctl, *args, check=check)

    def start_pluto(self) -> None:
        root, execdir = self.lsw_root, f"{LIBRESWAN_ROOT}/usr/libexec/ipsec"
        for sub in ("usr/sbin", "etc/ipsec.d", "nss", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        wrapper = root / "usr/sbin/ipsec"
        wrapper.write_text(f"#!/bin/sh\nexport IPSEC_EXECDIR={execdir} IPSEC_SBINDIR={LIBRESWAN_ROOT}/usr/sbin\n"
                           f"exec {LIBRESWAN_ROOT}/usr/sbin/ipsec \"$@\"\n")
        wrapper.chmod(0o755)
        if not (root / "nss/cert9.db").exists():
            run(["certutil", "-N", "-d", f"sql:{root}/nss", "--empty-password"])
        conf, secrets = root / "etc/ipsec.conf", root / "etc/ipsec.secrets"
        if not conf.exists():
            conf.write_text(f"config setup\n    logtime=yes\n    logappend=yes\n\ninclude {root}/etc/ipsec.d/*.conf\n")
        if not secrets.exists():
            secrets.write_text(f"include {root}/etc/ipsec.d/*.secrets\n")
        for stale in ("pluto.pid", "pluto.ctl"):
            try:
                (root / "run" / stale).unlink()
            except FileNotFoundError:
                pass
        # pluto runs /usr/libexec/ipsec/addconn (a compiled-in path) at startup: a private mount
        # namespace overlays the extracted libexec on the real one, for pluto alone.
        script = (f"mount -t overlay ovs-ipsec-lsw -o lowerdir={LIBRESWAN_ROOT}/usr/libexec:/usr/libexec /usr/libexec"
                  f" && mount -t tmpfs ovs-ipsec-lsw-run /run && mkdir -p /run/pluto"
                  f" && exec {execdir}/pluto --config {conf} --secretsfile {secrets} --nssdir {root}/nss"
                  f" --rundir {root}/run --ipsecdir {root}/etc/ipsec.d --logfile {self.workdir}/pluto.log")
        with open(self.workdir / "pluto.out", "ab") as log:
            subprocess.run(self.netns("unshare", "-m", "--propagation", "private", "sh", "-c", script),
                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True, timeout=30,
                           start_new_session=True)
        wait_for(lambda: _socket_answers(self.pluto_ctl), 20, what=f"pluto control socket on {self.name}")
        self.pluto_pid = wait_for(lambda: _read_pid(root / "run/pluto.pid"), 10, what="pluto's pid file")

    def stop_pluto(self, hard: bool = False) -> None:
        if self.pluto_pid is not None:
            _kill_pid(self.pluto_pid, signal.SIGKILL if hard else signal.SIGTERM)
            self.pluto_pid = None

    # -- the monitor -----------------------------------------------------------------------

    def daemon_flags(self) -> list[str]:
        if self.ike_daemon == "libreswan":
            return ["--ike-daemon=libreswan", f"--root-prefix={self.lsw_root}", "--ipsec-conf=/etc/ipsec.conf",
                    "--ipsec-secrets=/etc/ipsec.secrets", "--ipsec-d=/nss", "--ipsec-ctl=/run/pluto.ctl"]
        return [f"--vici-uri=unix://{self.vici_path}"]

    def start_ike_daemon(self) -> None:
        self.start_pluto() if self.ike_daemon == "libreswan" else self.start_charon()

    def stop_ike_daemon(self, hard: bool = False) -> None:
        self.stop_pluto(hard) if self.ike_daemon == "libreswan" else self.stop_charon(hard)

    def start_monitor(self, *extra: str) -> None:
        d = self.workdir
        argv = self.netns(sys.executable, "-m", "ovs_ipsec.cli.main", "monitor", self.db,
                          *self.daemon_flags(), f"--unixctl={self.unixctl}",
                          f"--pidfile={d}/ovs-monitor-ipsec.pid", f"--log-file={d}/ovs-monitor-ipsec.log",
                          "--detach", "--no-chdir", "-vconsole:off", *extra)
        subprocess.run(argv, env=self.env, check=True, timeout=60)
        wait_for(lambda: _socket_answers(self.unixctl), 20, what=f"monitor control socket on {self.name}")

    def monitor_pid(self) -> int | None:
        return _read_pid(self.workdir / "ovs-monitor-ipsec.pid")

    def stop_monitor(self, cleanup: bool = False, hard: bool = False) -> None:
        pid = self.monitor_pid()
        if pid is None:
            return
        if hard:
            _kill_pid(pid, signal.SIGKILL)
        else:
            self.appctl("exit", *([] if cleanup else ["--no-cleanup"]), timeout=90)
            _wait_gone(pid, 30)
        for path in (self.workdir / "ovs-monitor-ipsec.pid", Path(self.unixctl)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def appctl(self, *args: str, timeout: float = 30) -> str:
        return run(["ovs-appctl", "-t", self.unixctl, *args], timeout=timeout).stdout

    def status(self) -> dict:
        return json.loads(self.appctl("tunnels/show", "--json"))

    def tunnel(self, name: str) -> dict | None:
        return next((t for t in self.status()["tunnels"] if t["name"] == name), None)

    def wait_state(self, name: str, state: str, timeout: float = 30) -> dict:
        return wait_for(lambda: _if_state(self.tunnel(name), state), timeout,
                        what=f"tunnel {name} on {self.name} to be {state} (now {self.tunnel(name)})")

    def log_text(self) -> str:
        path = self.workdir / "ovs-monitor-ipsec.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        for stop in (lambda: self.stop_monitor(hard=True), self.stop_charon, self.stop_pluto, self.stop_ovsdb):
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


def _if_state(tunnel: dict | None, state: str) -> dict | None:
    return tunnel if tunnel is not None and tunnel["state"] == state else None


def _socket_answers(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_pidfile(pidfile: Path) -> None:
    pid = _read_pid(pidfile)
    if pid is not None:
        _kill_pid(pid, signal.SIGTERM)


def _kill_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    _wait_gone(pid, 10)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children
            if finished:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _is_zombie(pid):
            return
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True
