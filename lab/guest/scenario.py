"""The declarative scenario entries of lab/scenarios.toml, and the facts derived from them."""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# Default UDP destination ports of the UDP-based tunnel types (GRE has none).
DEFAULT_PORTS = {"geneve": 6081, "vxlan": 4789}
TUNNELS = ("gre", "geneve", "vxlan")
# psk: options:psk; cert: self-signed certificates (options:remote_cert); ca: CA-signed
# certificates (other_config:ca_cert + options:remote_name); ca-rsa: the same with RSA keys, as
# upstream's ovs-pki makes them (upstream peers need them). How: guest/auth.py.
AUTHS = ("psk", "cert", "ca", "ca-rsa", "manual")  # manual: ESP keys set by hand (control = "userspace-esp")
# What a scenario must show to pass; the rules are in runner.EXPECTATIONS (netns hosts) and
# systemd_lab.EXPECTATIONS (systemd hosts).
EXPECTS = ("encrypted", "guarded", "last-good", "interop", "throughput", "lifecycle", "upgrade", "reboot")
# Where the two hosts run: netns (network namespaces of the VM, daemons started by the runner) or
# systemd (systemd-nspawn machines booting Debian's systemd, our .deb installed with apt; see
# guest/systemd_lab.py). systemd hosts need the host image (labhost/hostimage.py), booted apart.
HOSTS = ("netns", "systemd")
SYSTEMD_EXPECTS = ("lifecycle", "upgrade", "reboot")
# libreswan-custom-conf: pluto reads a read-only root ipsec.conf that includes the monitor's
# --ipsec-conf, and the monitor runs with --root-ipsec-conf and --use-default-crypto.
BACKENDS = ("strongswan", "libreswan", "libreswan-custom-conf", "none")
# Which host runs Debian's upstream ovs-monitor-ipsec instead of ours (guest/upstream.py): none, h1
# (the lower address: upstream initiates, ours is the responder) or h2 (ours initiates).
UPSTREAM_HOSTS = ("", "h1", "h2")
# Who creates the tunnel: the operator with ovs-vsctl on each host, or OVN (guest/ovn.py: each
# host an OVN chassis, ovn-controller makes the tunnel after `ovn-nbctl set nb_global . ipsec=true`).
# userspace-esp (guest/userspace.py): h1 a netdev hypervisor with our userspace ESP bump, h2 a
# kernel-datapath one with manual kernel XFRM SAs holding the same keys.
CONTROLS = ("ovs-vsctl", "ovn", "userspace-esp")
UNDERLAYS = {
    # family: (host 1 address, host 2 address, prefix length)
    "ipv4": ("10.0.0.1", "10.0.0.2", 24),
    "ipv6": ("fd00:10::1", "fd00:10::2", 64),
}
# The overlay addresses on br-ipsec, as in upstream's tests/system-ipsec.at.
OVERLAY = ("192.0.0.1", "192.0.0.2", 24)
# The third host of `third_host` scenarios: its underlay address (same segment) and overlay address.
THIRD = {"ipv4": "10.0.0.3", "ipv6": "fd00:10::3", "overlay": "192.0.0.3"}


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
    host: str = "netns"
    # Not in the default run (make check); `lab/run.sh --full` or `--only` runs it.
    extended: bool = False
    # other_config:ipsec_skb_mark on both hosts (systemd scenarios; "" = unset).
    skb_mark: str = ""
    # Upstream's cases (issue 13): who runs upstream's monitor (UPSTREAM_HOSTS); tunnels without
    # local_ip (each host then has a default route via its peer, as upstream's harness); the peer
    # configured this many seconds after h1 (its daemons started then too).
    upstream: str = ""
    local_ip: bool = True
    peer_delay: int = 0
    # "established conns survive a third host joining": h1, h2 and h3 on one switch; once h1-h2 is up,
    # h3 joins with a tunnel to h1 (guest/third.py), and the h1-h2 SAs must not change.
    third_host: bool = False

    def __post_init__(self):
        for value, allowed in ((self.tunnel, TUNNELS), (self.auth, AUTHS),
                               (self.backend, BACKENDS), (self.underlay, tuple(UNDERLAYS)),
                               (self.expect, EXPECTS), (self.control, CONTROLS), (self.host, HOSTS),
                               (self.upstream, UPSTREAM_HOSTS)):
            if value not in allowed:
                raise ValueError(f"scenario {self.name}: {value!r} is not one of {', '.join(allowed)}")
        # OVN encapsulates in Geneve or VXLAN, names peers by chassis (CA-signed certificates) and
        # makes its own tunnel options.
        if self.control == "ovn" and (self.tunnel == "gre" or self.auth != "ca" or self.options
                                      or self.expect != "encrypted"):
            raise ValueError(f"scenario {self.name}: OVN needs tunnel geneve or vxlan, auth ca, "
                             "no options and expect encrypted")
        # Userspace ESP (guest/userspace.py): manual keys without an IKE daemon, or (interop only)
        # psk with strongSwan negotiating; and those values belong to it alone.
        manual = self.auth == "manual" and self.backend == "none"
        ike = self.auth == "psk" and self.backend == "strongswan" and self.expect == "interop"
        if self.control == "userspace-esp" and (not (manual or ike) or self.options or self.underlay != "ipv4"
                                                or self.expect not in ("interop", "throughput")):
            raise ValueError(f"scenario {self.name}: userspace-esp needs auth manual and backend none, or auth "
                             "psk and backend strongswan (interop), expect interop or throughput, no options and "
                             "the ipv4 underlay")
        if self.control != "userspace-esp" and (self.auth == "manual" or self.backend == "none"
                                                or self.expect in ("interop", "throughput")):
            raise ValueError(f"scenario {self.name}: auth manual, backend none and expect interop or "
                             "throughput are for control userspace-esp")
        if (self.host == "systemd") != (self.expect in SYSTEMD_EXPECTS) or \
                (self.host == "systemd" and (self.backend != "strongswan" or self.control != "ovs-vsctl")):
            raise ValueError(f"scenario {self.name}: expect {', '.join(SYSTEMD_EXPECTS)} is for host = "
                             "\"systemd\" (strongswan, ovs-vsctl), and systemd hosts need one of them")
        if self.upstream and (self.control != "ovs-vsctl" or self.expect != "encrypted" or self.auth in ("ca", "cert")
                              or self.backend not in ("strongswan", "libreswan")):
            raise ValueError(f"scenario {self.name}: an upstream peer needs ovs-vsctl, expect encrypted, auth psk "
                             "or ca-rsa (upstream writes RSA key lines) and backend strongswan or libreswan")
        if self.peer_delay and (self.control != "ovs-vsctl" or self.upstream):
            raise ValueError(f"scenario {self.name}: peer_delay needs ovs-vsctl and our monitor on both hosts")
        if self.third_host and (self.control != "ovs-vsctl" or self.upstream or self.peer_delay or self.auth != "psk"
                                or self.expect != "encrypted"):
            raise ValueError(f"scenario {self.name}: third_host needs ovs-vsctl, psk, expect encrypted and our "
                             "monitor on every host")

    @property
    def trap_only(self) -> bool:
        """No monitor initiates by itself: the first tunnel packet must (a PSK tunnel without
        local_ip has no initiator rule both ends agree on; upstream's strongSwan mode is auto=route)."""
        upstream_initiates = self.upstream == "h1"
        return ((not self.local_ip and self.auth == "psk")
                or (upstream_initiates and self.backend == "strongswan"))

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
                "control": self.control, "host": self.host, "extended": self.extended,
                "skb_mark": self.skb_mark, "upstream": self.upstream, "local_ip": self.local_ip,
                "peer_delay": self.peer_delay, "third_host": self.third_host}


def load(path: Path) -> list:
    entries = tomllib.loads(path.read_text())["scenario"]
    scenarios = [Scenario(**entry) for entry in entries]
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ValueError("scenario names must be unique")
    return scenarios
