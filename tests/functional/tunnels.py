"""Helpers for functional tests: tunnels configured with ovs-vsctl, and what charon holds."""

from __future__ import annotations


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
