"""Debian's upstream ovs-monitor-ipsec (OVS 3.1), sandboxed in a test host: the benchmark's
`upstream` column and the mixed-cluster tests (one host ours, its peer upstream's).

strongSwan (UpstreamStrongswan): upstream drives charon through starter and stroke, which
hard-code /etc/ipsec.conf, /etc/ipsec.secrets, /etc/strongswan.d and /var/run. So the monitor runs
in the host's network namespace *and* a private mount namespace: a tmpfs on /run and bind mounts
of files under the host's work folder over the /etc paths (shared/research/env-feasibility.md
section 3). The monitor's own `ipsec restart` then starts starter and charon inside that
namespace, writing nothing outside it. Our additions to its strongswan.d (a copy of the
machine's): charon's VICI socket in the work folder, so a test or the benchmark can ask this
charon exactly what it asks ours; the same file log as the sandbox's charon-systemd; and the
caller's extra charon settings (e.g. block_threshold).

LibreSwan (UpstreamLibreswan): no mount namespace is needed: every path it uses takes
--root-prefix, and it drives the host's own sandboxed pluto (Host.start_pluto), the kind ours gets.

Both are stopped by PID (the monitor, and for strongSwan the starter and charon it started).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .procs import is_zombie, live_children, socket_answers, wait_for

SCRIPT = "/usr/share/openvswitch/scripts/ovs-monitor-ipsec"
PYTHON = "/usr/bin/python3"


def upstream_missing() -> str | None:
    """Why upstream's monitor cannot run here (None: it can)."""
    if not os.path.exists(SCRIPT):
        return f"{SCRIPT} is missing (Debian's openvswitch-ipsec)"
    if not os.path.exists("/usr/lib/ipsec/starter") or not os.path.exists("/usr/lib/ipsec/stroke"):
        return "strongSwan's starter and stroke are missing (strongswan-starter)"
    return None


class _Upstream:
    """What both flavours share: the work folder, the unixctl socket, the log, stopping by PID."""

    def __init__(self, host) -> None:
        self.host = host
        self.dir = host.workdir / "upstream"
        self.root = self.dir / "root"
        self.pid: int | None = None

    @property
    def unixctl(self) -> str:
        return f"{self.dir}/ovs-monitor-ipsec.{self.pid}.ctl"

    @property
    def env(self) -> dict[str, str]:
        d = str(self.dir)
        return {**os.environ, "OVS_RUNDIR": d, "OVS_LOGDIR": d, "OVS_DBDIR": d}

    def appctl(self, *args: str, timeout: float = 30) -> str:
        return subprocess.run(["ovs-appctl", "-t", self.unixctl, f"--timeout={int(timeout)}", *args],
                              capture_output=True, text=True, check=True, timeout=timeout + 5).stdout

    def tunnels_show(self) -> str:
        """Upstream's own report (`tunnels/show`): per tunnel its kernel policies, SAs and the
        lines of `ipsec status` it counts as the tunnel's active connections."""
        return self.appctl("tunnels/show")

    def active_conns(self, tunnel: str) -> list[str]:
        """The lines upstream lists under "IPsec connections that are active" for `tunnel`."""
        text = self.tunnels_show()
        match = re.search(rf"^Interface name: {re.escape(tunnel)} v\d+ .*?\n\n", text + "\n\n", re.M | re.S)
        if not match:
            return []
        section = match.group(0).split("IPsec connections that are active:\n", 1)
        return [line.strip() for line in section[1].splitlines() if line.strip()] if len(section) == 2 else []

    def log_text(self) -> str:
        path = self.dir / "ovs-monitor-ipsec.log"
        return path.read_text() if path.exists() else ""

    def busy(self) -> bool:
        return bool(self.pid and live_children(self.pid))

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def _started(self, timeout: float) -> None:
        self.pid = wait_for(lambda: _read_int(self.dir / "ovs-monitor-ipsec.pid"), timeout,
                            what="upstream's pidfile")
        wait_for(lambda: socket_answers(self.unixctl), timeout, what="upstream's unixctl socket")


class UpstreamStrongswan(_Upstream):
    def __init__(self, host, extra_charon_conf: str = "") -> None:
        super().__init__(host)
        self.extra_charon_conf = extra_charon_conf
        self.starter_pid: int | None = None
        self.charon_pid: int | None = None

    @property
    def vici_path(self) -> str:
        return f"{self.dir}/charon.vici"

    def start(self, timeout: float = 60) -> None:
        self._prepare()
        d, r = self.dir, self.root
        (r / "etc/ipsec.d/cacerts").mkdir(parents=True, exist_ok=True)
        for sub in ("usr/sbin", "sbin"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/strongswan.d", r / "etc/strongswan.d", symlinks=True, dirs_exist_ok=True)
        for link, target in (("usr/sbin/ipsec", "/usr/sbin/ipsec"), ("sbin/ip", "/sbin/ip")):
            if not (r / link).exists():
                os.symlink(target, r / link)
        for name in ("ipsec.conf", "ipsec.secrets"):
            (r / "etc" / name).touch()
        (r / "etc/strongswan.d/zz-testsupport.conf").write_text(f"""charon {{
  {self.extra_charon_conf}
  plugins {{ vici {{ socket = unix://{self.vici_path} }} }}
  filelog {{ testsupport {{ path = {d}/charon.log
                     time_format = %T
                     flush_line = yes
                     append = yes
                     default = 1 }} }}
}}
""")
        inner = (f"mount -t tmpfs ovs-ipsec-upstream-run /run && "
                 f"mount --bind {r}/etc/ipsec.conf /etc/ipsec.conf && "
                 f"mount --bind {r}/etc/ipsec.secrets /etc/ipsec.secrets && "
                 f"mount --bind {r}/etc/strongswan.d /etc/strongswan.d && "
                 f"mount --bind {r}/etc/ipsec.d/cacerts /etc/ipsec.d/cacerts && "
                 f"exec {PYTHON} {SCRIPT} --root-prefix={r} --ike-daemon=strongswan "
                 f"--pidfile={d}/ovs-monitor-ipsec.pid --log-file={d}/ovs-monitor-ipsec.log "
                 f"--detach --no-chdir -vconsole:off {self.host.db}")
        with open(d / "monitor-start.out", "ab") as out:
            subprocess.run(self.host.netns("unshare", "-m", "--propagation", "private", "bash", "-c", inner),
                           env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True,
                           timeout=timeout)
        self._started(timeout)
        # Its `ipsec restart` started starter and charon in the monitor's mount namespace: their
        # pidfiles are on that /run, seen through the monitor's root.
        self.starter_pid = wait_for(lambda: _read_int(f"/proc/{self.pid}/root/run/starter.charon.pid"), timeout,
                                    what="upstream's starter")
        self.charon_pid = wait_for(lambda: _read_int(f"/proc/{self.pid}/root/run/charon.pid"), timeout,
                                   what="upstream's charon")
        wait_for(lambda: socket_answers(self.vici_path), timeout, what="upstream's charon VICI socket")

    def trust_ca(self, cacert: Path | str) -> None:
        """What the OVS IPsec tutorial has an operator do for CA-signed certificates with strongSwan:
        copy the CA certificate into /etc/ipsec.d/cacerts (upstream's own `ca` section in
        ipsec.conf lacks `auto=add`, so charon ignores it). Call before start(), or charon rereads
        its CA certificates through stroke."""
        folder = self.root / "etc/ipsec.d/cacerts"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(cacert, folder / Path(cacert).name)
        if self.pid is not None:
            subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-n", "/usr/sbin/ipsec", "rereadcacerts"],
                           check=True, capture_output=True, timeout=30)

    def stop(self) -> None:
        """Monitor first (exit --no-cleanup, so it does not react), then starter and charon by PID."""
        if self.pid is not None:
            stop_monitor(self.pid, self.unixctl)
        for pid in (self.starter_pid, self.charon_pid):
            if pid is not None and _alive(pid):
                _signal(pid, signal.SIGTERM)
                _wait_gone(pid, 10) or _signal(pid, signal.SIGKILL)
        for pid in (self.pid, self.starter_pid, self.charon_pid):
            if pid is not None:
                _wait_gone(pid, 5)
        self.pid = self.starter_pid = self.charon_pid = None

    def session(self):
        """A VICI session with upstream's charon (through the socket our strongswan.d adds)."""
        import socket

        import vici

        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(self.vici_path)
        return vici.Session(sock)

    def ike_sa_ids(self) -> dict[str, str]:
        """{stroke connection name: IKE SA unique id} of the SAs upstream's charon has established."""
        return {name: sa["uniqueid"].decode() for event in self.session().list_sas() for name, sa in event.items()
                if sa["state"] == b"ESTABLISHED"}


class UpstreamLibreswan(_Upstream):
    """The same script with --ike-daemon=libreswan, driving the pluto the caller started on the
    host (Host.start_pluto: the very kind ours drives) through that host's `ipsec` wrapper.

    Its root prefix is a folder of its own whose etc, run and nss are links into the host's pluto
    root, so it writes pluto's ipsec.conf and ipsec.secrets (which it owns whole, as upstream does)
    and talks to pluto's control socket, while its usr/sbin/ipsec is a guard: LibreSwan's
    `ipsec start|stop|restart` is `systemctl ... ipsec.service`, and on this machine ipsec.service
    is strongSwan's starter. Its start-up restart is turned off (--no-restart-ike-daemon) instead:
    the pluto it finds is fresh already, and the restart would otherwise only have emptied its two
    files (it rewrites them on every pass anyway) and cleaned NSS entries a fresh pluto does not have.
    """

    def start(self, timeout: float = 60) -> None:
        self._prepare()
        d, r, pluto_root = self.dir, self.root, self.host.lsw_root
        for sub in ("usr/sbin", "sbin"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        if not (r / "sbin/ip").exists():  # its tunnels/show runs <root>/sbin/ip (and dies without it)
            os.symlink("/sbin/ip", r / "sbin/ip")
        for sub in ("etc", "run", "nss"):
            if not (r / sub).is_symlink():
                os.symlink(pluto_root / sub, r / sub)
        guard = r / "usr/sbin/ipsec"
        guard.write_text('#!/bin/sh\n'
                         'case "$1" in start|stop|restart|--start|--stop|--restart)\n'
                         '  echo "testsupport: ipsec $1 refused: it would reach the machine\'s ipsec.service" >&2;'
                         ' exit 1;;\n'
                         'esac\n'
                         f'exec {pluto_root}/usr/sbin/ipsec "$@"\n')
        guard.chmod(0o755)
        argv = self.host.netns(
            PYTHON, SCRIPT, f"--root-prefix={r}", "--ike-daemon=libreswan", "--no-restart-ike-daemon",
            "--ipsec-conf=/etc/ipsec.conf", "--ipsec-secrets=/etc/ipsec.secrets", "--ipsec-d=/nss",
            "--ipsec-ctl=/run/pluto.ctl", f"--pidfile={d}/ovs-monitor-ipsec.pid",
            f"--log-file={d}/ovs-monitor-ipsec.log", "--detach", "--no-chdir", "-vconsole:off", self.host.db)
        with open(d / "monitor-start.out", "ab") as out:
            subprocess.run(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True,
                           timeout=timeout)
        self._started(timeout)

    def stop(self) -> None:
        """The monitor only: pluto is the caller's."""
        if self.pid is not None:
            stop_monitor(self.pid, self.unixctl)
            self.pid = None


def upstream_monitor(host, extra_charon_conf: str = "") -> UpstreamStrongswan | UpstreamLibreswan:
    """Upstream's monitor for this host's IKE daemon (host.ike_daemon)."""
    if host.ike_daemon == "libreswan":
        return UpstreamLibreswan(host)
    return UpstreamStrongswan(host, extra_charon_conf)


def stop_monitor(pid: int, unixctl: str) -> None:
    """`exit --no-cleanup` (so it does not react), or signals by PID when it does not answer: a
    monitor cut off in the middle of its work serves unixctl only when that work is done. An
    `ipsec ...` it was running finishes by itself (within a command); it is waited for, by PID."""
    children = live_children(pid)
    try:
        answered = subprocess.run(["ovs-appctl", "-t", unixctl, "--timeout=5", "exit", "--no-cleanup"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        answered = False
    if not (answered and _wait_gone(pid, 10)):
        _signal(pid, signal.SIGTERM)
        _wait_gone(pid, 10) or _signal(pid, signal.SIGKILL)
    for child in children:
        _wait_gone(child, 10) or _signal(child, signal.SIGKILL)


def _read_int(path: Path | str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and not is_zombie(pid)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False
