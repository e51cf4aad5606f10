"""Helpers for functional tests: tunnels configured with ovs-vsctl, and what charon holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def add_tunnel(host, peer, name, tunnel_type="geneve", family=4, **options):
    """`ovs-vsctl add-port` exactly as the OVS IPsec documentation shows it."""
    local, remote = (host.addresses[0], peer.addresses[0]) if family == 4 else (host.addresses[1], peer.addresses[1])
    options = {"local_ip": local, "remote_ip": remote, **options}
    settings = [f"options:{key}={value}" for key, value in options.items() if value is not None]
    host.vsctl("add-port", "br-ipsec", name, "--", "set", "interface", name, f"type={tunnel_type}", *settings)


def add_pair(a, b, name, tunnel_type="geneve", **options):
    add_tunnel(a, b, name, tunnel_type, **options)
    add_tunnel(b, a, name, tunnel_type, **options)


def ike_sa_ids(host) -> dict[str, str]:
    """{conn name: IKE SA unique id} straight from charon."""
    return {name: sa["uniqueid"].decode() for event in host.vici().list_sas() for name, sa in event.items()}


def charon_conns(host) -> set[str]:
    return {name.decode() for name in host.vici().get_conns()["conns"]}


def charon_secrets(host) -> set[str]:
    return {name.decode() for name in host.vici().get_shared()["keys"]}


def pki(folder: Path, *args: str) -> None:
    """`ovs-ipsec pki --dir <folder>/pki ...`, run in `folder` as the seed tutorial does."""
    subprocess.run([sys.executable, "-m", "ovs_ipsec.cli.pki_main", "--dir", str(folder / "pki"), *args],
                   cwd=folder, check=True, capture_output=True)


def use_certificate(host, folder: Path, name: str, ca: bool) -> None:
    """other_config:certificate/private_key (and ca_cert) as the OVS IPsec documentation says."""
    settings = [f"other_config:certificate={folder}/{name}-cert.pem",
                f"other_config:private_key={folder}/{name}-privkey.pem"]
    if ca:
        settings.append(f"other_config:ca_cert={folder}/pki/switchca/cacert.pem")
    host.vsctl("set", "Open_vSwitch", ".", *settings)


def make_ca_signed(folder: Path) -> None:
    """A switch CA and two host certificates it signed, made exactly as the seed tutorial says."""
    pki(folder, "init")
    for name in ("hostA", "hostB"):
        pki(folder, "req", name)
        pki(folder, "sign", name, "switch")


def make_self_signed(folder: Path) -> None:
    for name in ("hostA", "hostB"):
        pki(folder, "req", name)
        pki(folder, "self-sign", name)


def connect_with_certificates(a, b, folder: Path, tunnel_type: str, ca: bool) -> None:
    """hostA on a, hostB on b; a tunnel both ways; both sides established with the right auth."""
    use_certificate(a, folder, "hostA", ca=ca)
    use_certificate(b, folder, "hostB", ca=ca)
    for host, peer, peer_name in ((a, b, "hostB"), (b, a, "hostA")):
        auth = {"remote_name": peer_name} if ca else {"remote_cert": f"{folder}/{peer_name}-cert.pem"}
        add_tunnel(host, peer, "tun", tunnel_type, **auth)
    for host, peer_name in ((a, "hostB"), (b, "hostA")):
        tunnel = host.wait_ike_up("tun")
        assert tunnel["auth"] == ("ca-cert" if ca else "peer-cert")
        if ca:
            assert tunnel["remote_name"] == peer_name


TUNNEL_PORTS = {"geneve": 6081, "vxlan": 4789}
_SEND = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
if sys.argv[2] == "gre":
    sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_GRE)
    sock.sendto(bytes(4), (sys.argv[1], 0))
else:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.sendto(b"ovs-ipsec test", (sys.argv[1], int(sys.argv[3])))
"""


def send_tunnel_packet(host, remote_ip: str, tunnel_type: str, dst_port: int | None = None) -> None:
    """One packet of the tunnel's protocol from `host` to `remote_ip`, as the datapath would send
    it: it hits the tunnel's trap policy, and the kernel asks the IKE daemon for an SA (acquire).
    (No ovs-vswitchd runs here: this stands in for the first encapsulated packet.)"""
    port = dst_port or TUNNEL_PORTS.get(tunnel_type, 0)
    subprocess.run(host.netns(sys.executable, "-c", _SEND, remote_ip, tunnel_type, str(port)),
                   check=True, capture_output=True, timeout=20)
