"""The declarative scenario entries of lab/scenarios.toml, and the facts derived from them."""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# Default UDP destination ports of the UDP-based tunnel types (GRE has none).
DEFAULT_PORTS = {"geneve": 6081, "vxlan": 4789}
TUNNELS = ("gre", "geneve", "vxlan")
# psk: options:psk; cert: self-signed certificates (options:remote_cert); ca: CA-signed
# certificates (other_config:ca_cert + options:remote_name). How: guest/auth.py.
AUTHS = ("psk", "cert", "ca")
# What a scenario must show to pass; the rules are in runner.EXPECTATIONS.
EXPECTS = ("encrypted", "guarded", "last-good")
BACKENDS = ("strongswan", "libreswan")
# Who creates the tunnel: the operator with ovs-vsctl on each host, or OVN (guest/ovn.py: each
# host an OVN chassis, ovn-controller makes the tunnel after `ovn-nbctl set nb_global . ipsec=true`).
CONTROLS = ("ovs-vsctl", "ovn")
UNDERLAYS = {
    # family: (host 1 address, host 2 address, prefix length)
    "ipv4": ("10.0.0.1", "10.0.0.2", 24),
    "ipv6": ("fd00:10::1", "fd00:10::2", 64),
}
# The overlay addresses on br-ipsec, as in upstream's tests/system-ipsec.at.
OVERLAY = ("192.0.0.1", "192.0.0.2", 24)


@dataclass(frozen=True)
class Scenario:
    name: str
    tunnel: str
    auth: str
    backend: str
    underlay: str = "ipv4"
    options: dict = field(default_factory=dict)
    expect: str = "encrypted"
    control: str = "ovs-vsctl"

    def __post_init__(self):
        for value, allowed in ((self.tunnel, TUNNELS), (self.auth, AUTHS),
                               (self.backend, BACKENDS), (self.underlay, tuple(UNDERLAYS)),
                               (self.expect, EXPECTS), (self.control, CONTROLS)):
            if value not in allowed:
                raise ValueError(f"scenario {self.name}: {value!r} is not one of {', '.join(allowed)}")
        # OVN encapsulates in Geneve or VXLAN, names peers by chassis (CA-signed certificates) and
        # makes its own tunnel options.
        if self.control == "ovn" and (self.tunnel == "gre" or self.auth != "ca" or self.options
                                      or self.expect != "encrypted"):
            raise ValueError(f"scenario {self.name}: OVN needs tunnel geneve or vxlan, auth ca, "
                             "no options and expect encrypted")

    @property
    def port(self):
        """The tunnel's real UDP destination port on the wire (None for GRE)."""
        if self.tunnel == "gre":
            return None
        return int(self.options.get("dst_port", DEFAULT_PORTS[self.tunnel]))

    @property
    def plaintext_filter(self) -> str:
        """tcpdump filter for unencrypted tunnel packets on the underlay: must never match."""
        if self.port is None:
            return "ip proto 47 or ip6 proto 47"
        return f"udp port {self.port}"

    def summary(self) -> dict:
        return {"name": self.name, "tunnel": self.tunnel, "auth": self.auth, "backend": self.backend,
                "underlay": self.underlay, "options": dict(self.options), "expect": self.expect,
                "control": self.control}


def load(path: Path) -> list:
    entries = tomllib.loads(path.read_text())["scenario"]
    scenarios = [Scenario(**entry) for entry in entries]
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ValueError("scenario names must be unique")
    return scenarios
