"""Debian's ovs-monitor-ipsec (OVS 3.1, strongSwan through starter/stroke), sandboxed in a host.

strongSwan's starter, stroke and charon hard-code /etc/ipsec.conf, /etc/ipsec.secrets,
/etc/strongswan.d and /var/run, so the monitor runs in the host's network namespace *and* a
private mount namespace: a tmpfs on /run and bind mounts of files under the host's work folder
over the /etc paths (shared/research/env-feasibility.md section 3). The monitor's own
`ipsec restart` then starts starter and charon inside that namespace, writing nothing outside it.

Our additions to its strongswan.d (a copy of the machine's): charon's VICI socket in the work
folder, so the benchmark can ask this charon exactly what it asks ours; the same file log as the
sandbox's charon-systemd; and the caller's extra charon settings (e.g. block_threshold).

With LibreSwan (UpstreamLibreswan) no mount namespace is needed: every path it uses takes
--root-prefix, and it drives the host's own sandboxed pluto, the kind ours gets (see there).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from common import live_children, log, wait_socket

SCRIPT = "/usr/share/openvswitch/scripts/ovs-monitor-ipsec"
PYTHON = "/usr/bin/python3"


class Upstream:
    def __init__(self, host, extra_charon_conf: str = "") -> None:
        self.host = host
        self.dir = host.workdir / "upstream"
        self.root = self.dir / "root"
        self.extra_charon_conf = extra_charon_conf
        self.pid: int | None = None
        self.starter_pid: int | None = None
        self.charon_pid: int | None = None

    @property
    def vici_path(self) -> str:
        return f"{self.dir}/charon.vici"

    def start(self, timeout: float = 60) -> None:
        d, r = self.dir, self.root
        (r / "etc").mkdir(parents=True, exist_ok=True)
        for sub in ("usr/sbin", "sbin"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/strongswan.d", r / "etc/strongswan.d", symlinks=True, dirs_exist_ok=True)
        for link, target in (("usr/sbin/ipsec", "/usr/sbin/ipsec"), ("sbin/ip", "/sbin/ip")):
            if not (r / link).exists():
                os.symlink(target, r / link)
        for name in ("ipsec.conf", "ipsec.secrets"):
            (r / "etc" / name).touch()
        (r / "etc/strongswan.d/zz-bench.conf").write_text(f"""charon {{
  {self.extra_charon_conf}
  plugins {{ vici {{ socket = unix://{self.vici_path} }} }}
  filelog {{ bench {{ path = {d}/charon.log
                     time_format = %T
                     flush_line = yes
                     append = yes
                     default = 1 }} }}
}}
""")
        env = {**os.environ, "OVS_RUNDIR": str(d), "OVS_LOGDIR": str(d), "OVS_DBDIR": str(d)}
        inner = (f"mount -t tmpfs bench-run /run && "
                 f"mount --bind {r}/etc/ipsec.conf /etc/ipsec.conf && "
                 f"mount --bind {r}/etc/ipsec.secrets /etc/ipsec.secrets && "
                 f"mount --bind {r}/etc/strongswan.d /etc/strongswan.d && "
                 f"exec {PYTHON} {SCRIPT} --root-prefix={r} --ike-daemon=strongswan "
                 f"--pidfile={d}/ovs-monitor-ipsec.pid --log-file={d}/ovs-monitor-ipsec.log "
                 f"--detach --no-chdir -vconsole:off {self.host.db}")
        with open(d / "monitor-start.out", "ab") as out:
            subprocess.run(self.host.netns("unshare", "-m", "--propagation", "private", "bash", "-c", inner),
                           env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True, timeout=timeout)
        self.pid = int((d / "ovs-monitor-ipsec.pid").read_text())
        deadline = time.time() + timeout
        while self.charon_pid is None or self.starter_pid is None:
            try:
                self.starter_pid = int(Path(f"/proc/{self.pid}/root/run/starter.charon.pid").read_text())
                self.charon_pid = int(Path(f"/proc/{self.pid}/root/run/charon.pid").read_text())
            except (OSError, ValueError):
                if time.time() > deadline:
                    raise TimeoutError("upstream's `ipsec restart` did not start starter and charon")
                time.sleep(0.1)
        wait_socket(self.vici_path, timeout)
        log(f"  upstream monitor {self.pid}, starter {self.starter_pid}, charon {self.charon_pid}")

    def unixctl(self) -> str:
        return f"{self.dir}/ovs-monitor-ipsec.{self.pid}.ctl"

    def stop(self) -> None:
        """Monitor first (exit --no-cleanup, so it does not react), then starter and charon by PID."""
        if self.pid is not None:
            stop_monitor(self.pid, self.unixctl())
        for pid in (self.starter_pid, self.charon_pid):
            if pid is not None and _alive(pid):
                _signal(pid, signal.SIGTERM)
                _wait_gone(pid, 10) or _signal(pid, signal.SIGKILL)
        for pid in (self.pid, self.starter_pid, self.charon_pid):
            if pid is not None:
                _wait_gone(pid, 5)
        self.pid = self.starter_pid = self.charon_pid = None

    def busy(self) -> bool:
        return bool(self.pid and live_children(self.pid))


class UpstreamLibreswan:
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

    def __init__(self, host) -> None:
        self.host = host
        self.dir = host.workdir / "upstream"
        self.root = self.dir / "root"
        self.pid: int | None = None

    def start(self, timeout: float = 60) -> None:
        d, r, pluto_root = self.dir, self.root, self.host.lsw_root
        (r / "usr/sbin").mkdir(parents=True, exist_ok=True)
        for sub in ("etc", "run", "nss"):
            if not (r / sub).is_symlink():
                os.symlink(pluto_root / sub, r / sub)
        guard = r / "usr/sbin/ipsec"
        guard.write_text('#!/bin/sh\n'
                         'case "$1" in start|stop|restart|--start|--stop|--restart)\n'
                         '  echo "bench: ipsec $1 refused: it would reach the machine\'s ipsec.service" >&2; exit 1;;\n'
                         'esac\n'
                         f'exec {pluto_root}/usr/sbin/ipsec "$@"\n')
        guard.chmod(0o755)
        env = {**os.environ, "OVS_RUNDIR": str(d), "OVS_LOGDIR": str(d), "OVS_DBDIR": str(d)}
        argv = self.host.netns(
            PYTHON, SCRIPT, f"--root-prefix={r}", "--ike-daemon=libreswan", "--no-restart-ike-daemon",
            "--ipsec-conf=/etc/ipsec.conf", "--ipsec-secrets=/etc/ipsec.secrets", "--ipsec-d=/nss",
            "--ipsec-ctl=/run/pluto.ctl", f"--pidfile={d}/ovs-monitor-ipsec.pid",
            f"--log-file={d}/ovs-monitor-ipsec.log", "--detach", "--no-chdir", "-vconsole:off", self.host.db)
        with open(d / "monitor-start.out", "ab") as out:
            subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True,
                           timeout=timeout)
        self.pid = int((d / "ovs-monitor-ipsec.pid").read_text())
        wait_socket(self.unixctl(), timeout)
        log(f"  upstream monitor {self.pid} on pluto {self.host.pluto_pid}")

    def unixctl(self) -> str:
        return f"{self.dir}/ovs-monitor-ipsec.{self.pid}.ctl"

    def stop(self) -> None:
        """The monitor only: pluto is the caller's."""
        if self.pid is not None:
            stop_monitor(self.pid, self.unixctl())
            self.pid = None


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


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False
