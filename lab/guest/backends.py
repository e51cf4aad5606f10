"""IKE daemons the monitor can drive. One class per `backend` value of lab/scenarios.toml.

A backend starts and stops its daemon for one lab host and tells the monitor how to reach it.
Add LibreSwan by writing a class with the same four members and registering it in BACKENDS.
"""

import signal
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


BACKENDS = {"strongswan": StrongSwan}
