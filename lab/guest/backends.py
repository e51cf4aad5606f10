"""IKE daemons the monitor can drive. One class per `backend` value of lab/scenarios.toml.

A backend starts and stops its daemon for one lab host and tells the monitor how to reach it.
Another daemon is one more class with the same members, registered in BACKENDS.
"""

import re
import signal
from pathlib import Path

from hosts import Host
from proc import stop_pid, wait_for

from testsupport.charon import strongswan_conf   # the one strongswan.conf template (overlay: /opt/ovs-ipsec)


class _Daemon:
    """One daemon process per host, started in the host's namespace with a private /run (`ip netns
    exec` runs in a private mount namespace, so a tmpfs there is the daemon's alone: two hosts'
    daemons never share a pidfile or default socket) and stopped by pid."""

    def __init__(self):
        self.procs = {}

    def _spawn(self, host: Host, command: str, ready: Path, log: str, env: dict = None) -> None:
        self.procs[host.name] = host.sh.spawn(["sh", "-c", f"mount -t tmpfs lab-run /run && {command}"],
                                              netns=host.name, env=env, log=host.dir / log)
        if not wait_for(ready.exists, timeout=30):
            raise RuntimeError(f"{host.name}: {self.name} did not open {ready} (see {log})")

    def stop(self, host: Host) -> None:
        proc = self.procs.pop(host.name, None)
        if proc:
            stop_pid(proc.pid, signal.SIGTERM)   # SIGKILL after its grace period
            proc.wait(timeout=5)


class StrongSwan(_Daemon):
    """charon-systemd with a private strongswan.conf and VICI socket per host."""

    name = "strongswan"
    logs = ("strongswan.conf", "charon.log", "charon.out")

    def vici(self, host: Host) -> Path:
        return host.dir / "charon.vici"

    def start(self, host: Host) -> None:
        conf = host.dir / "strongswan.conf"
        conf.write_text(strongswan_conf(host.name, host.dir, detail=2))
        self._spawn(host, "exec /usr/sbin/charon-systemd", self.vici(host), "charon.out",
                    env={"STRONGSWAN_CONF": str(conf)})

    def monitor_args(self, host: Host) -> list:
        return ["--ike-daemon", "strongswan", "--vici-uri", f"unix://{self.vici(host)}"]


IPSEC_CONF = """\
# LibreSwan for lab host {name}; written by lab/guest/backends.py. The monitor adds one
# .conf/.secrets pair per peer to {root}/etc/ipsec.d.
config setup
    logtime=yes
    logappend=yes

include {root}/etc/ipsec.d/*.conf
"""


class LibreSwan(_Daemon):
    """pluto with a private root per host (configuration, NSS database, control socket).

    The base image has LibreSwan unpacked at its compiled-in paths (labhost/image.py), so pluto
    runs as installed; only its files live under the host's folder, named to the monitor with
    the same --root-prefix/--ipsec-* flags an operator would use."""

    name = "libreswan"
    logs = ("pluto.log", "pluto.out")

    def root(self, host: Host) -> Path:
        return host.dir / "libreswan"

    def ctl(self, host: Host) -> Path:
        return self.root(host) / "run/pluto.ctl"

    def start(self, host: Host) -> None:
        root = self.root(host)
        for sub in ("usr/sbin", "etc/ipsec.d", "nss", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # The monitor runs <root-prefix>/usr/sbin/ipsec, as upstream's does.
        (root / "usr/sbin/ipsec").symlink_to("/usr/sbin/ipsec")
        host.sh.run(["certutil", "-N", "-d", f"sql:{root}/nss", "--empty-password"])
        conf, secrets = root / "etc/ipsec.conf", root / "etc/ipsec.secrets"
        self._write_conf(host, conf)
        secrets.write_text(f"include {root}/etc/ipsec.d/*.secrets\n")
        self._spawn(host, f"mkdir -p /run/pluto && exec /usr/libexec/ipsec/pluto --nofork --config {conf}"
                    f" --secretsfile {secrets} --nssdir {root}/nss --rundir {root}/run"
                    f" --ipsecdir {root}/etc/ipsec.d --logfile {host.dir}/pluto.log", self.ctl(host), "pluto.out")

    def _write_conf(self, host: Host, conf: Path) -> None:
        conf.write_text(IPSEC_CONF.format(name=host.name, root=self.root(host)))

    def monitor_args(self, host: Host) -> list:
        return ["--ike-daemon", "libreswan", "--root-prefix", self.root(host), "--ipsec-conf", "/etc/ipsec.conf",
                "--ipsec-secrets", "/etc/ipsec.secrets", "--ipsec-d", "/nss", "--ipsec-ctl", "/run/pluto.ctl"]


ROOT_CONF = """\
## A read-only root config. ##
# LibreSwan for lab host {name}; written by lab/guest/backends.py (LibreSwanCustomConf), as
# upstream's test "custom conf, default crypto": the monitor writes only what this includes.
config setup
    logtime=yes
    logappend=yes

include {root}/etc/custom.conf
"""


class LibreSwanCustomConf(LibreSwan):
    """upstream's "ipv4, geneve, custom conf, default crypto" (tests/system-ipsec.at): pluto reads a
    read-only root ipsec.conf (mode 0444) that includes the monitor's file; the monitor runs with
    --ipsec-conf /etc/custom.conf --root-ipsec-conf <that root file> --use-default-crypto, so no
    ike=/esp= line is written and both ends use pluto's default proposals. checks() says whether
    the files show that: no ike=, ikev2=, esp= line, no `conn %default`, the root file untouched."""

    name = "libreswan-custom-conf"

    def start(self, host: Host) -> None:
        root = self.root(host)
        (root / "etc").mkdir(parents=True, exist_ok=True)
        conf = root / "etc/ipsec.conf"
        conf.write_text(ROOT_CONF.format(name=host.name, root=root))
        conf.chmod(0o444)
        super().start(host)

    def _write_conf(self, host: Host, conf: Path) -> None:
        """The root file is the operator's: left as start() wrote it."""

    def monitor_args(self, host: Host) -> list:
        return [*super().monitor_args(host), "--ipsec-conf", "/etc/custom.conf",
                "--root-ipsec-conf", self.root(host) / "etc/ipsec.conf", "--use-default-crypto"]

    def checks(self, host: Host) -> dict:
        root = self.root(host)
        written = "".join(p.read_text() for p in [root / "etc/custom.conf", *sorted(root.glob("etc/ipsec.d/*.conf"))]
                          if p.exists())
        return {
            "root_conf_untouched": (root / "etc/ipsec.conf").read_text() == ROOT_CONF.format(name=host.name, root=root),
            "custom_conf_written": "include" in ((root / "etc/custom.conf").read_text()
                                                 if (root / "etc/custom.conf").exists() else ""),
            "no_crypto_lines": not re.search(r"^\s*(ike|ikev2|esp)=", written, re.M),
            "no_conn_default": "conn %default" not in written,
        }


BACKENDS = {"strongswan": StrongSwan, "libreswan": LibreSwan, "libreswan-custom-conf": LibreSwanCustomConf}
