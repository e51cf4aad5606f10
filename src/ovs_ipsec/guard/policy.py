"""The plaintext guard as data: which kernel XFRM policies a configuration asks for. Pure.

other_config:ipsec_skb_mark turns the guard on (the seeds' "Plaintext Policies"):

* unset: no guard. Until an SA exists, tunnel packets are held only by the IKE daemon's trap
  policies, which exist only while it runs and has our connections loaded.
* `0/1`: every tunnel packet whose skb mark has bit 0 clear (the default) must be encrypted or is
  dropped; OpenFlow lets a non-IPsec tunnel through by setting pkt_mark bit 0.
* `1/1`: only tunnel packets that OpenFlow marked 1 are guarded. Any value/mask works the same way.

The guard is a set of `action block` policies, each at a priority of lower precedence than any
the IKE daemon installs. A packet is checked against the single best-matching policy, so once
charon has its own policy for a tunnel (trap or SA), charon's policy decides and the guard is not
consulted; when charon's policies are missing (not loaded yet, charon restarting or down, tunnel
being removed) the guard's block decides. The policies live in the kernel, so they outlive a
monitor crash and charon restarts.

Outbound (`dir out`): one policy per tunnel protocol and port, for each address family, from any
address to any address, with the skb mark as selector. Wildcard addresses because the seeds
promise *every* tunnel packet, including a tunnel the monitor has not read yet (the race the seeds
describe). The ports are the default ones (GRE, VXLAN 4789, Geneve 6081, STT 7471) plus every
`dst_port` configured on a tunnel interface, IPsec or not (a custom port is guarded from the
moment the monitor reads it, before its connection is loaded). The action is `block`, not a template
requiring ESP: a template without an SA also drops, but it makes the kernel send ACQUIREs for
traffic the IKE daemon never configured and could bind a packet to whatever SA happens to match
its addresses. Encryption is the IKE daemon's policies' job; the guard only guarantees that
nothing leaves in plaintext when they are absent.

Inbound (`dir in`), in every guard mode: for each IPsec tunnel, plaintext packets of its protocol
and port from its peer are dropped, which is exactly what charon's own inbound policies do once
loaded; the guard closes the window before that and while charon is down. A receiver cannot see
the sender's mark, so inbound ignores marks (a `1/1` host also drops unmarked plaintext from an
IPsec peer). ESP, IKE (UDP 500/4500) and traffic from other hosts never match. The destination
is any local address, never the tunnel's `local_ip`: the kernel treats two policies with the same
selector, mark and direction as one (priority is not part of the identity), and charon's inbound
policy for a tunnel with a known `local_ip` has exactly that selector.

Ownership marker: a policy is ours when its priority lies in OWNED_PRIORITIES (0x0F5EC000 to
0x0F5EC0FF, shown by `ip xfrm policy` as 257867776 to 257868031; the guard uses 257867777) *and*
it has exactly a guard policy's shape (dir in/out, action block, no template, protocol gre, udp or
tcp, no source port, no device, interface id or context). The band lies far beyond the
priorities strongSwan computes (at most 600000: 200000 per class, pass < trap/SA < fallback) and
those libreswan computes (it advises against anything above 65536), so the IKE daemon's policies
always take precedence and never look like ours; nothing else is ever changed
or removed. A policy at the place of a guard policy (same selector, mark and direction) is put
back into shape when its priority is in the band (altered by hand), and left alone and reported
when it is not (a foreign policy).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

from ..model import DEFAULT_PORTS, SkbMark, Tunnel, TunnelType, wire_traffic

# 0x0F5EC000 ("OVS-SEC"): the band of priorities that marks a kernel XFRM policy as ours.
OWNED_PRIORITIES = range(0x0F5EC000, 0x0F5EC100)
GUARD_PRIORITY = OWNED_PRIORITIES.start + 1

# Traffic of OVS tunnels on their default ports: guarded even before any tunnel uses it, because
# vswitchd may send on a new tunnel before the monitor has read it.
DEFAULT_TUNNEL_TRAFFIC: frozenset[tuple[str, int | None]] = frozenset({
    ("gre", None),
    ("udp", DEFAULT_PORTS[TunnelType.VXLAN]),
    ("udp", DEFAULT_PORTS[TunnelType.GENEVE]),
    ("tcp", DEFAULT_PORTS[TunnelType.STT]),
})

# IKE and NAT-T ESP must never be blocked, whatever port a tunnel claims.
IKE_TRAFFIC = frozenset({("udp", 500), ("udp", 4500)})

ANY = MappingProxyType({4: "0.0.0.0/0", 6: "::/0"})


@dataclass(frozen=True, order=True)
class GuardPolicy:
    """One kernel XFRM policy of the guard: drop packets matching this selector and mark."""

    direction: str  # "out" | "in"
    src: str  # network, normalised ("10.0.0.2/32", "::/0")
    dst: str
    protocol: str  # "gre" | "udp" | "tcp"
    dport: int | None  # None: every port (GRE has none)
    mark: SkbMark | None  # None: every packet whatever its mark
    priority: int = GUARD_PRIORITY

    @property
    def family(self) -> int:
        return ipaddress.ip_network(self.src).version

    @property
    def identity(self) -> tuple:
        """What the kernel compares to decide that two policies are the same one (not priority)."""
        return (self.direction, self.src, self.dst, self.protocol, None, self.dport, self.mark, False)

    def __str__(self) -> str:
        port = f" dport {self.dport}" if self.dport is not None else ""
        mark = f" mark {self.mark}" if self.mark is not None else ""
        return f"{self.direction} {self.src} -> {self.dst} {self.protocol}{port}{mark}"


@dataclass(frozen=True)
class InstalledPolicy:
    """A policy as the kernel lists it (ours or anyone's)."""

    direction: str  # "out" | "in" | "fwd" | "socket-in" | ...
    src: str
    dst: str
    protocol: str | None
    sport: int | None
    dport: int | None
    mark: SkbMark | None
    priority: int
    action: str  # "allow" | "block"
    index: int
    templates: bool = False
    other: bool = False  # a field the guard never uses (if_id, dev, sub policy type, context)

    @property
    def owned(self) -> bool:
        """Ours: a priority in our band and exactly the shape of a guard policy."""
        return self.priority in OWNED_PRIORITIES and self.as_guard_policy() is not None

    @property
    def identity(self) -> tuple:
        return (self.direction, self.src, self.dst, self.protocol, self.sport, self.dport, self.mark, self.other)

    def as_guard_policy(self) -> GuardPolicy | None:
        """The guard policy this is, if it has exactly a guard policy's shape."""
        if (self.direction not in ("in", "out") or self.action != "block" or self.templates or self.other
                or self.sport is not None or self.protocol not in ("gre", "udp", "tcp")):
            return None
        return GuardPolicy(self.direction, self.src, self.dst, self.protocol, self.dport, self.mark,
                           self.priority)


@dataclass(frozen=True)
class GuardChanges:
    """What to do in the kernel to reach the desired guard, and what cannot be done."""

    add: tuple[GuardPolicy, ...] = ()
    replace: tuple[GuardPolicy, ...] = ()  # ours at the same identity, in another shape: update in place
    remove: tuple[InstalledPolicy, ...] = ()
    blocked: tuple[tuple[GuardPolicy, InstalledPolicy], ...] = ()  # a foreign policy holds the identity

    @property
    def converged(self) -> bool:
        return not (self.add or self.replace or self.remove or self.blocked)


@dataclass(frozen=True)
class GuardStatus:
    """What status queries show about the guard."""

    configured: str | None = None  # other_config:ipsec_skb_mark as written
    mark: SkbMark | None = None  # the mark in force; None: no guard
    error: str | None = None  # a malformed value, or what the kernel refused
    in_place: bool = True  # the kernel holds exactly the policies the mode asks for
    installed: int = 0  # policies of ours in the kernel
    wanted: int = 0  # policies the mode asks for
    unknown: bool = False  # malformed value at start, and the kernel's policies tell no mode
    uncovered: tuple[str, ...] = ()  # IPsec tunnels on the userspace datapath, beyond any XFRM policy

    @property
    def mode(self) -> str:
        if self.unknown:
            return "unknown"
        return "off" if self.mark is None else str(self.mark)

    def as_json(self) -> dict:
        return {"mode": self.mode, "configured": self.configured, "error": self.error,
                "in_place": self.in_place, "policies": self.installed, "wanted": self.wanted,
                "uncovered": list(self.uncovered)}


def guard_policies(mark: SkbMark | None, tunnels: Iterable[Tunnel],
                   traffic: Iterable[tuple[str, int | None]] = ()) -> frozenset[GuardPolicy]:
    """The guard for a mark (None: off), the IPsec tunnels in force, and the traffic (protocol,
    port) of every tunnel Interface (GuardConfig.traffic): in a mode like `0/1` the unmarked
    packets of tunnels without IPsec are dropped too, as the seeds describe."""
    if mark is None:
        return frozenset()
    tunnels = tuple(tunnels)
    selector_mark = mark if mark.mask else None  # mask 0 matches every packet: no mark selector
    wanted = set(DEFAULT_TUNNEL_TRAFFIC) | set(traffic) | {wire_traffic(t.type, t.dst_port) for t in tunnels}
    policies = {GuardPolicy("out", ANY[family], ANY[family], protocol, port, selector_mark)
                for protocol, port in wanted - IKE_TRAFFIC for family in (4, 6)}
    for tunnel in tunnels:
        protocol, port = wire_traffic(tunnel.type, tunnel.dst_port)
        if (protocol, port) in IKE_TRAFFIC:
            continue
        peer = str(ipaddress.ip_network(tunnel.remote_ip))
        policies.add(GuardPolicy("in", peer, ANY[tunnel.family], protocol, port, None))
    return frozenset(policies)


def plan_changes(desired: frozenset[GuardPolicy], installed: Iterable[InstalledPolicy]) -> GuardChanges:
    """Desired guard vs the kernel's policies -> the changes, touching only policies we own."""
    owned: dict[tuple, InstalledPolicy] = {}
    in_band: dict[tuple, InstalledPolicy] = {}  # ours, or ours altered in place (say, to allow)
    foreign: dict[tuple, InstalledPolicy] = {}
    for policy in installed:
        if policy.owned:
            owned[policy.identity] = policy
        if policy.priority in OWNED_PRIORITIES:
            in_band[policy.identity] = policy
        else:
            foreign[policy.identity] = policy
    add: list[GuardPolicy] = []
    replace: list[GuardPolicy] = []
    blocked: list[tuple[GuardPolicy, InstalledPolicy]] = []
    for wanted_policy in sorted(desired):
        present = in_band.get(wanted_policy.identity)
        if present is not None:
            if present.as_guard_policy() != wanted_policy:
                replace.append(wanted_policy)
        elif wanted_policy.identity in foreign:
            blocked.append((wanted_policy, foreign[wanted_policy.identity]))
        else:
            add.append(wanted_policy)
    wanted = {policy.identity for policy in desired}
    remove = [installed for identity, installed in sorted(owned.items(), key=lambda item: item[1].index)
              if identity not in wanted]
    return GuardChanges(tuple(add), tuple(replace), tuple(remove), tuple(blocked))


def mark_in_force(installed: Iterable[InstalledPolicy]) -> tuple[bool, SkbMark | None]:
    """Read the mode back from the kernel: (known, mark). Used when the configured value is
    malformed and the monitor has no memory of the previous one (it just started).

    No policy of ours: the guard was off. Outbound policies of ours that agree on one mark: that
    mode. Anything else (mixed marks, inbound only): unknown, and nothing should be touched.
    """
    ours = [policy for policy in installed if policy.owned]
    if not ours:
        return True, None
    marks = {policy.mark for policy in ours if policy.direction == "out"}
    if len(marks) == 1:
        (mark,) = marks
        return True, mark if mark is not None else SkbMark(0, 0)
    return False, None
