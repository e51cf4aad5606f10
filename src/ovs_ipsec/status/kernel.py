"""The kernel's policies and SAs as an operator reads them: per tunnel in `tunnels/show`, and whole in
`xfrm/policies` and `xfrm/state`. Pure: values from netlink/xfrm.py in, lines out. No key is ever
in the values, so none can be printed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from ..guard.policy import OWNED_PRIORITIES
from ..netlink.xfrm import KernelPolicy, KernelSA, Selector
from .snapshot import TunnelStatus


@dataclass(frozen=True)
class KernelView:
    """One reading of the kernel's SPD and SAD; `error` says why it could not be read."""

    policies: tuple[KernelPolicy, ...] = ()
    states: tuple[KernelSA, ...] = ()
    error: str | None = None


def policy_line(policy: KernelPolicy) -> str:
    line = f"{policy.direction:<3} {policy.selector} {policy.action} priority {policy.priority}"
    if policy.mark is not None:
        line += f" mark {policy.mark[0]:#x}/{policy.mark[1]:#x}"
    if policy.templates:
        line += " requires ESP"
    if policy.priority in OWNED_PRIORITIES:
        line += " (plaintext guard)"
    return line


def sa_line(state: KernelSA) -> str:
    line = (f"{state.src} -> {state.dst} {state.protocol} spi {state.spi:#010x} {state.mode} reqid {state.reqid}"
            f" {'+'.join(state.algorithms) or '-'} sel {state.selector}: {state.bytes} bytes, {state.packets} packets")
    return line + (" udp-encap" if state.encapsulated else "")


def tunnel_policies(tunnel: TunnelStatus, policies: Iterable[KernelPolicy]) -> list[str]:
    """The policies that can decide this tunnel's packets: to or from its peer, for its protocol and
    port, and the plaintext guard's for its traffic."""
    return [policy_line(p) for p in policies if _concerns(tunnel, p.selector, any_peer=True)]


def tunnel_states(tunnel: TunnelStatus, states: Iterable[KernelSA]) -> list[str]:
    return [sa_line(s) for s in states if tunnel.remote_ip in (s.src, s.dst) and _concerns(tunnel, s.selector)]


def _concerns(tunnel: TunnelStatus, selector: Selector, any_peer: bool = False) -> bool:
    if not tunnel.remote_ip:
        return False
    peer = str(ipaddress.ip_network(tunnel.remote_ip))
    ends = (selector.src, selector.dst)
    wildcard = any_peer and all(ipaddress.ip_network(end).prefixlen == 0 for end in ends)
    if peer not in ends and not wildcard:
        return False
    protocol = "gre" if tunnel.type in ("gre", "ip6gre") else "tcp" if tunnel.type == "stt" else "udp"
    if selector.protocol not in (None, protocol):
        return False
    if protocol == "gre" or tunnel.dst_port is None:
        return True
    return tunnel.dst_port in (selector.sport, selector.dport) or (selector.sport, selector.dport) == (None, None)
