"""charon (strongSwan's IKE daemon) for one test host: a private strongswan.conf and VICI socket.

The one strongswan.conf template of the project's tests, demos, benchmark and lab.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from .procs import kill_pid, socket_answers, unlink, wait_for

CHARON = "/usr/sbin/charon-systemd"
# Plugins charon needs for IKEv2 with PSK or certificates, AES-GCM ESP and the kernel's xfrm, in
# load (priority) order (kdf provides prf+ for IKE key derivation to strongSwan 5.9.8; without it:
# "key derivation failed").
CHARON_PLUGINS = ("random nonce openssl pem pkcs1 pkcs8 x509 revocation constraints pubkey aes sha1 sha2 "
                  "hmac gcm kdf curve25519 kernel-netlink socket-default vici updown")
# strongSwan's own implementations of what its openssl plugin also provides: Debian 12 (5.9.8) ships
# them, Debian 13 (6.0.1) builds none of them (its openssl plugin provides AES, SHA, HMAC, the KDFs
# and X25519). They are loaded where they exist, as is updown (scripts on SA events); every other
# plugin must exist: charon itself only logs a missing plugin, and the failure would show far away.
CHARON_OPTIONAL_PLUGINS = ("aes", "sha1", "sha2", "hmac", "kdf", "curve25519", "updown")
CHARON_PLUGIN_DIR = Path("/usr/lib/ipsec/plugins")


def charon_plugins(plugin_dir: Path = CHARON_PLUGIN_DIR) -> str:
    """CHARON_PLUGINS as this system's charon has them (see CHARON_OPTIONAL_PLUGINS)."""
    wanted = CHARON_PLUGINS.split()
    present = {p for p in wanted if (plugin_dir / f"libstrongswan-{p}.so").exists()}
    missing = [p for p in wanted if p not in present and p not in CHARON_OPTIONAL_PLUGINS]
    if missing:
        raise RuntimeError(f"charon plugins missing from {plugin_dir}: {', '.join(missing)}")
    return " ".join(p for p in wanted if p in present)

STRONGSWAN_CONF = """\
# strongSwan for host {name} (tests, demos, bench, lab); written by testsupport/charon.py
charon-systemd {{
  load_modular = no
  load = {plugins}
  # The monitor manages transport-mode SAs only; charon must not touch routes.
  install_routes = no
  install_virtual_ip = no
  {extra}
  plugins {{
    vici {{
      socket = unix://{vici}
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
    test {{
      path = {log}
      time_format = %T
      flush_line = yes
      append = yes
      default = 1
      ike = {detail}
      knl = {detail}
      cfg = {detail}
    }}
  }}
}}
swanctl {{
  socket = unix://{vici}
}}
"""


def strongswan_conf(name: str, workdir: Path | str, extra: str = "", detail: int = 1) -> str:
    return STRONGSWAN_CONF.format(name=name, plugins=charon_plugins(), extra=extra, vici=f"{workdir}/charon.vici",
                                  log=f"{workdir}/charon.log", detail=detail)


class Charon:
    def __init__(self, name: str, workdir: Path, netns: list[str], extra_conf: str = "") -> None:
        self.name = name
        self.workdir = workdir
        self._netns = netns  # argv prefix that runs a command in the host's namespace
        self.extra_conf = extra_conf
        self.pid: int | None = None

    @property
    def vici_path(self) -> str:
        return f"{self.workdir}/charon.vici"

    def start(self) -> None:
        conf = self.workdir / "strongswan.conf"
        conf.write_text(strongswan_conf(self.name, self.workdir, self.extra_conf))
        with open(self.workdir / "charon.out", "ab") as log:
            process = subprocess.Popen([*self._netns, CHARON], env={**os.environ, "STRONGSWAN_CONF": str(conf)},
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.pid = process.pid
        wait_for(lambda: socket_answers(self.vici_path), 20, what=f"charon VICI socket on {self.name}")

    def stop(self, hard: bool = False) -> None:
        if self.pid is not None:
            kill_pid(self.pid, signal.SIGKILL if hard else signal.SIGTERM)
            self.pid = None
            unlink(self.vici_path)

    def session(self):
        import vici

        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(self.vici_path)
        return vici.Session(sock)
