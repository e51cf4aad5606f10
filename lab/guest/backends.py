"""IKE daemons the monitor can drive. One class per `backend` value of lab/scenarios.toml.

A backend starts and stops its daemon for one lab host and tells the monitor how to reach it.
Another daemon is one more class with the same members, registered in BACKENDS.
"""

import signal
import subprocess
from pathlib import Path

from hosts import Host
from proc import stop_pid, wait_for

# Plugins charon needs for IKEv2 with PSK or certificates, AES-GCM ESP and the kernel's xfrm
# (kdf provides prf+ for IKE key derivation; without it: "key derivation failed").
CHARON_PLUGINS = ("random nonce openssl pem pkcs1 pkcs8 x509 revocation constraints pubkey "
                  "aes sha1 sha2 hmac gcm kdf kernel-netlink socket-default vici updown")

STRONGSWAN_CONF = """\
# strongSwan for lab host {name}; written by lab/guest/backends.py
charon-systemd {{
  load_modular = no
  load = {plugins}
  # The monitor manages transport-mode SAs only; charon must not touch routes.
  install_routes = no
  install_virtual_ip = no
  plugins {{
    vici {{
      socket = unix://{dir}/charon.vici
    }}
    kernel-netlink {{
      # Transport SAs carry the tunnel's protocol and port as selectors, as the monitor's
      # traffic selectors do: an SA then only matches that tunnel's traffic.
      set_proto_port_transport_sa = yes
    }}
  }}
  journal {{
    default = -1
  }}
  filelog {{
    lab {{
      path = {dir}/charon.log
      time_format = %T
      flush_line = yes
      default = 1
      ike = 2
      knl = 2
      cfg = 2
    }}
  }}
}}
swanctl {{
  socket = unix://{dir}/charon.vici
}}
"""


class StrongSwan:
    """charon-systemd with a private strongswan.conf and VICI socket per host."""

    name = "strongswan"
    logs = ("strongswan.conf", "charon.log", "charon.out")

    def __init__(self):
        self.procs = {}

    def vici(self, host: Host) -> Path:
        return host.dir / "charon.vici"

    def start(self, host: Host) -> None:
        conf = host.dir / "strongswan.conf"
        conf.write_text(STRONGSWAN_CONF.format(name=host.name, dir=host.dir, plugins=CHARON_PLUGINS))
        # `ip netns exec` runs in a private mount namespace; a tmpfs on /run there gives each
        # charon its own /run (pidfile, default sockets), so two charons never collide.
        self.procs[host.name] = host.sh.spawn(
            ["sh", "-c", "mount -t tmpfs lab-run /run && exec /usr/sbin/charon-systemd"],
            netns=host.name, env={"STRONGSWAN_CONF": str(conf)}, log=host.dir / "charon.out")
        if not wait_for(self.vici(host).exists, timeout=30):
            raise RuntimeError(f"{host.name}: charon did not open {self.vici(host)} (see charon.out)")

    def stop(self, host: Host) -> None:
        proc = self.procs.pop(host.name, None)
        if proc:
            stop_pid(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)

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


class LibreSwan:
    """pluto with a private root per host (configuration, NSS database, control socket).

    The base image has LibreSwan unpacked at its compiled-in paths (labhost/image.py), so pluto
    runs as installed; only its files live under the host's folder, named to the monitor with
    the same --root-prefix/--ipsec-* flags an operator would use."""

    name = "libreswan"
    logs = ("pluto.log", "pluto.out")

    def __init__(self):
        self.procs = {}

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
        conf.write_text(IPSEC_CONF.format(name=host.name, root=root))
        secrets.write_text(f"include {root}/etc/ipsec.d/*.secrets\n")
        # As for charon: a private /run, so the two plutos never share a default path.
        self.procs[host.name] = host.sh.spawn(
            ["sh", "-c", "mount -t tmpfs lab-run /run && mkdir -p /run/pluto && exec /usr/libexec/ipsec/pluto"
             f" --nofork --config {conf} --secretsfile {secrets} --nssdir {root}/nss --rundir {root}/run"
             f" --ipsecdir {root}/etc/ipsec.d --logfile {host.dir}/pluto.log"],
            netns=host.name, log=host.dir / "pluto.out")
        if not wait_for(self.ctl(host).exists, timeout=30):
            raise RuntimeError(f"{host.name}: pluto did not open {self.ctl(host)} (see pluto.out)")

    def stop(self, host: Host) -> None:
        proc = self.procs.pop(host.name, None)
        if proc:
            stop_pid(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def monitor_args(self, host: Host) -> list:
        return ["--ike-daemon", "libreswan", "--root-prefix", self.root(host), "--ipsec-conf", "/etc/ipsec.conf",
                "--ipsec-secrets", "/etc/ipsec.secrets", "--ipsec-d", "/nss", "--ipsec-ctl", "/run/pluto.ctl"]


BACKENDS = {"strongswan": StrongSwan, "libreswan": LibreSwan}
