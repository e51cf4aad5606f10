"""Debian's upstream ovs-monitor-ipsec on one lab host (scenario field `upstream`): a mixed cluster,
one host ours and its peer upstream's, as while hosts are upgraded one at a time (issue 13).

The script is Debian's own (/usr/share/openvswitch/scripts/ovs-monitor-ipsec from openvswitch-ipsec:
OVS 3.1 on Debian 12, 3.5 on Debian 13), run by Debian's python3 with Debian's python3-openvswitch,
exactly as its systemd unit would, plus the flags that keep it inside the host's folder.

* strongSwan: upstream drives charon through starter and stroke (`ipsec restart|update|...`), which
  hard-code /etc/ipsec.conf, /etc/ipsec.secrets, /etc/strongswan.d and /run. The image has
  strongSwan's starter and charon next to charon-systemd (labhost/image.py), and keeps strongSwan's
  `ipsec` as /usr/sbin/ipsec.strongswan (LibreSwan's owns /usr/sbin/ipsec). The monitor runs in the
  host's namespace, whose `ip netns exec` mount namespace gets a tmpfs on /run and bind mounts of the
  host's own files over those /etc paths, so its `ipsec restart` starts starter and charon for this
  host alone. No charon-systemd runs on this host (both would bind UDP 500). For CA-signed
  certificates the CA goes into /etc/ipsec.d/cacerts, as the OVS IPsec tutorial tells operators:
  upstream's own `ca` section lacks `auto=add`, and charon ignores it.
* LibreSwan: the host's pluto (backends.LibreSwan) with the same --root-prefix layout ours gets,
  and --no-restart-ike-daemon (its restart is `systemctl restart ipsec`). Upstream then owns that
  root's ipsec.conf and ipsec.secrets whole, as it does on a real host.

Upstream has no status JSON. poll() answers in our status shape from two sources: the host's
kernel (ESP SAs between the two underlay addresses: `established` needs one each way) and
upstream's own `tunnels/show` (its configuration section: auth and peer name; its list of active
connections is kept in the scenario's files, since OVS 3.1's strongSwan regex files UDP tunnels'
connections under the wrong interface, ovs-issues#355).
"""

import re
import shutil
import signal
from pathlib import Path

from hosts import Host
from proc import stop_pid, wait_for

SCRIPT = "/usr/share/openvswitch/scripts/ovs-monitor-ipsec"
STRONGSWAN_IPSEC = "/usr/sbin/ipsec.strongswan"   # labhost/image.py keeps strongSwan's `ipsec` here


class UpstreamMonitor:
    logs = ("upstream-ovs-monitor-ipsec.log", "upstream-monitor.out", "upstream-charon.log",
            "upstream-tunnels-show.txt", "upstream-ipsec.conf")

    def __init__(self, host: Host, backend, tunnel: str, peer: Host, children: int = 2):
        self.host, self.backend, self.tunnel, self.peer = host, backend, tunnel, peer
        # Child SAs that make the tunnel encrypting: upstream has one connection for GRE, two
        # (tun-in-1, tun-out-1: one per UDP port direction) for Geneve and VXLAN.
        self.children = children
        self.strongswan = backend.name == "strongswan"
        self.root = host.dir / "upstream-root" if self.strongswan else backend.root(host)
        self.pidfile = host.dir / "upstream-ovs-monitor-ipsec.pid"
        self.pid = None
        self.daemon_pids = []   # starter and charon (strongSwan), stopped by pid

    @property
    def needs_backend(self) -> bool:
        """Whether the scenario's IKE daemon must run on this host: upstream's strongSwan mode
        starts its own charon (through starter); its LibreSwan mode drives the host's pluto."""
        return not self.strongswan

    @property
    def ctl(self) -> Path:
        return self.host.dir / f"ovs-monitor-ipsec.{self.pid}.ctl"

    def start(self) -> None:
        h, d, r = self.host, self.host.dir, self.root
        # Info, not debug: at debug upstream logs every OVSDB update, PSKs included.
        common = [f"--root-prefix={r}", f"--pidfile={self.pidfile}", f"--log-file={d}/upstream-ovs-monitor-ipsec.log",
                  "--detach", "--no-chdir", "-vconsole:off", "-vfile:info", h.db]
        for sub in ("usr/sbin", "sbin"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        if not (r / "sbin/ip").exists():   # its tunnels/show runs <root>/sbin/ip (and dies without it)
            (r / "sbin/ip").symlink_to("/sbin/ip")
        if self.strongswan:
            self._prepare_strongswan()
            command = (f"mount -t tmpfs lab-upstream-run /run"
                       f" && mount --bind {r}/etc/ipsec.conf /etc/ipsec.conf"
                       f" && mount --bind {r}/etc/ipsec.secrets /etc/ipsec.secrets"
                       f" && mount --bind {r}/etc/strongswan.d /etc/strongswan.d"
                       f" && mount --bind {r}/etc/ipsec.d/cacerts /etc/ipsec.d/cacerts"
                       f" && exec python3 {SCRIPT} --ike-daemon=strongswan {' '.join(map(str, common))}")
            argv = ["sh", "-c", command]
        else:
            argv = ["python3", SCRIPT, "--ike-daemon=libreswan", "--no-restart-ike-daemon",
                    "--ipsec-conf=/etc/ipsec.conf", "--ipsec-secrets=/etc/ipsec.secrets", "--ipsec-d=/nss",
                    "--ipsec-ctl=/run/pluto.ctl", *common]
        h.sh.run(argv, netns=h.name, env=h.ovs_env, log=d / "upstream-monitor.out", timeout=120)
        if not wait_for(lambda: _read_pid(self.pidfile), timeout=30):
            raise RuntimeError(f"{h.name}: upstream's monitor wrote no pidfile (see upstream-monitor.out)")
        self.pid = _read_pid(self.pidfile)
        if not wait_for(self.ctl.exists, timeout=30):
            raise RuntimeError(f"{h.name}: upstream's monitor did not create {self.ctl}")
        if self.strongswan:
            # Its `ipsec restart` started starter and charon; their pidfiles are on its private /run.
            run = Path(f"/proc/{self.pid}/root/run")
            if not wait_for(lambda: (run / "charon.pid").exists() and (run / "starter.charon.pid").exists(), 60):
                raise RuntimeError(f"{h.name}: upstream's `ipsec restart` did not start starter and charon")
            self.daemon_pids = [_read_pid(run / "starter.charon.pid"), _read_pid(run / "charon.pid")]
            h.sh.note(f"{h.name}: upstream monitor {self.pid}, starter and charon {self.daemon_pids}")

    def _prepare_strongswan(self) -> None:
        r, d = self.root, self.host.dir
        (r / "etc/ipsec.d/cacerts").mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/strongswan.d", r / "etc/strongswan.d", symlinks=True, dirs_exist_ok=True)
        (r / "etc/strongswan.d/zz-lab.conf").write_text(f"""# lab/guest/upstream.py: this charon's log
charon {{
  filelog {{
    lab {{
      path = {d}/upstream-charon.log
      time_format = %T
      flush_line = yes
      default = 1
      ike = 2
      knl = 2
      cfg = 2
    }}
  }}
}}
""")
        for name in ("ipsec.conf", "ipsec.secrets"):
            (r / "etc" / name).touch()
        # strongSwan's `ipsec restart` runs `$IPSEC_SBINDIR/ipsec stop` and `... start`, which in the
        # image is LibreSwan's: this root's copy names itself instead.
        script = Path(STRONGSWAN_IPSEC).read_text()
        if 'IPSEC_SBINDIR="/usr/sbin"' not in script:
            raise RuntimeError(f"{STRONGSWAN_IPSEC}: no IPSEC_SBINDIR line to point at {r}/usr/sbin")
        ipsec = r / "usr/sbin/ipsec"
        ipsec.write_text(script.replace('IPSEC_SBINDIR="/usr/sbin"', f'IPSEC_SBINDIR="{r}/usr/sbin"', 1))
        ipsec.chmod(0o755)

    def trust_ca(self, cacert: Path) -> None:
        """strongSwan: the CA into /etc/ipsec.d/cacerts (the tutorial's step), then charon rereads."""
        if not self.strongswan:
            return
        shutil.copy2(cacert, self.root / "etc/ipsec.d/cacerts" / cacert.name)
        self.host.sh.run(["nsenter", "-t", self.pid, "-m", "-n", STRONGSWAN_IPSEC, "rereadcacerts"], timeout=30)

    # -- status, in our JSON's shape ------------------------------------------------------------

    def _show(self, quiet: bool = True) -> str:
        cp = self.host.sh.run(["ovs-appctl", "-t", self.ctl, "tunnels/show"], timeout=15, quiet=quiet, check=False)
        return _redact(cp.stdout + cp.stderr)

    def _esp_sas(self) -> dict:
        """ESP SAs in this host's kernel between the two underlay addresses, per direction."""
        cp = self.host.sh.run(["ip", "xfrm", "state"], netns=self.host.name, quiet=True, timeout=15)
        counts = {"out": 0, "in": 0}
        for src, dst in re.findall(r"^src (\S+) dst (\S+)\s*\n\s*proto esp spi 0x[0-9a-f]+", cp.stdout, re.M):
            if (src, dst) == (self.host.ip, self.peer.ip):
                counts["out"] += 1
            elif (src, dst) == (self.peer.ip, self.host.ip):
                counts["in"] += 1
        return counts

    def poll(self) -> dict:
        show, sas = self._show(), self._esp_sas()
        section = _section(show, self.tunnel)
        field = dict(re.findall(r"^  ([A-Z][A-Za-z ]+):\s+(.*)$", section, re.M))
        if field.get("PSK", "None") != "None":
            auth = "psk"
        elif field.get("Remote cert", "None") != "None":
            auth = "peer-cert"
        else:
            auth = "ca-cert" if field.get("CA cert", "None") != "None" else None
        # Each child SA is one ESP SA each way in the kernel.
        established = min(sas["in"], sas["out"]) >= self.children
        state = "established" if established else ("loaded" if "(CONFIGURED)" in section else "pending")
        active = section.split("IPsec connections that are active:", 1)[-1].strip().splitlines() if section else []
        return {"implementation": "upstream ovs-monitor-ipsec", "tunnels": [{
            "name": self.tunnel, "state": state, "encrypting": established, "child_sas": sas["in"] + sas["out"],
            "esp_sas": sas, "auth": auth,
            "remote_name": None if field.get("Remote name", "None") == "None" else field.get("Remote name"),
            "upstream_active_connections": [line.strip() for line in active]}]}

    def status(self) -> dict:
        (self.host.dir / "upstream-tunnels-show.txt").write_text(self._show(quiet=False))
        if (self.root / "etc/ipsec.conf").exists():
            shutil.copy2(self.root / "etc/ipsec.conf", self.host.dir / "upstream-ipsec.conf")
        return self.poll()

    def stop(self) -> None:
        """The monitor first (no cleanup: it is not asked to exit), then starter and charon, by pid."""
        if self.pid:
            stop_pid(self.pid, signal.SIGTERM)
        for pid in self.daemon_pids:
            if pid:
                stop_pid(pid, signal.SIGTERM)


def _read_pid(path: Path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _section(show: str, tunnel: str) -> str:
    match = re.search(rf"^Interface name: {re.escape(tunnel)} v\d+ .*?(?=^Interface name: |\Z)", show, re.M | re.S)
    return match.group(0) if match else ""


def _redact(text: str) -> str:
    """Upstream prints the PSK in tunnels/show; the scenario's files do not keep it."""
    # [ \t]+ then \S: the whole gap is consumed, so "None" (no PSK) is seen and kept.
    return re.sub(r"^(  PSK:[ \t]+)(?!None$)\S.*$", r"\1<redacted by the lab>", text, flags=re.M)
