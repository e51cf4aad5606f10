"""pluto (LibreSwan's IKE daemon) for one test host, with a private root.

The monitor sees a root prefix <workdir>/root holding what a LibreSwan host has: an `ipsec`
command (a wrapper around the extracted one), /etc/ipsec.conf and ipsec.secrets that include
/etc/ipsec.d/*.conf|*.secrets (as Debian's do), the NSS database in /nss and pluto's control
socket in /run. Debian's libreswan conflicts with strongSwan as a package: scripts/setup-libreswan.sh
extracts its .deb under LIBRESWAN_ROOT, and pluto runs from there in a private mount namespace.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from ovs_ipsec.runner import run

from .procs import kill_pid, read_pid, socket_answers, unlink, wait_for

LIBRESWAN_ROOT = os.path.join(os.environ.get("LIBRESWAN_ROOT", "/var/cache/ovs-ipsec/libreswan"), "root")


class Pluto:
    def __init__(self, name: str, workdir: Path, netns: list[str]) -> None:
        self.name = name
        self.workdir = workdir
        self._netns = netns
        self.pid: int | None = None

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def ctl(self) -> str:
        return f"{self.root}/run/pluto.ctl"

    def monitor_flags(self) -> list[str]:
        return ["--ike-daemon=libreswan", f"--root-prefix={self.root}", "--ipsec-conf=/etc/ipsec.conf",
                "--ipsec-secrets=/etc/ipsec.secrets", "--ipsec-d=/nss", "--ipsec-ctl=/run/pluto.ctl"]

    def ipsec(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        return run([f"{self.root}/usr/sbin/ipsec", *args], timeout=timeout, check=check).stdout

    def whack(self, *args: str, check: bool = True) -> str:
        return self.ipsec("whack", "--ctlsocket", self.ctl, *args, check=check)

    def start(self) -> None:
        root, execdir = self.root, f"{LIBRESWAN_ROOT}/usr/libexec/ipsec"
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
        unlink(root / "run/pluto.pid", root / "run/pluto.ctl")
        # pluto runs /usr/libexec/ipsec/addconn (a compiled-in path) at startup: a private mount
        # namespace overlays the extracted libexec on the real one, for pluto alone.
        script = (f"mount -t overlay ovs-ipsec-lsw -o lowerdir={LIBRESWAN_ROOT}/usr/libexec:/usr/libexec /usr/libexec"
                  f" && mount -t tmpfs ovs-ipsec-lsw-run /run && mkdir -p /run/pluto"
                  # pluto runs its updown script as `ipsec _updown` (routed connections: a tunnel
                  # without local_ip): that must be LibreSwan's `ipsec`, not strongSwan's in /usr/sbin.
                  f" && export PATH={LIBRESWAN_ROOT}/usr/sbin:$PATH"
                  f" && exec {execdir}/pluto --config {conf} --secretsfile {secrets} --nssdir {root}/nss"
                  f" --rundir {root}/run --ipsecdir {root}/etc/ipsec.d --logfile {self.workdir}/pluto.log")
        with open(self.workdir / "pluto.out", "ab") as log:
            subprocess.run([*self._netns, "unshare", "-m", "--propagation", "private", "sh", "-c", script],
                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True, timeout=30,
                           start_new_session=True)
        wait_for(lambda: socket_answers(self.ctl), 20, what=f"pluto control socket on {self.name}")
        self.pid = wait_for(lambda: read_pid(root / "run/pluto.pid"), 10, what="pluto's pid file")

    def stop(self, hard: bool = False) -> None:
        if self.pid is not None:
            kill_pid(self.pid, signal.SIGKILL if hard else signal.SIGTERM)
            self.pid = None
