"""IKEv2-negotiated SAs for userspace ESP: charon negotiates, the kernel holds the keys, we use them.

charon can only hand SAs to a kernel interface (its kernel-netlink plugin; libipsec is tunnel
mode only). So on a netdev host charon negotiates the tunnel's transport SAs as usual, but with
`policies = no` (no XFRM policy: the kernel never sends through them) and `mark_in`/`mark_out`
(a state with a mark matches only packets carrying it: arriving ESP, unmarked, finds no kernel
state and is dropped by the kernel after our raw socket got its copy). The SAs sit in the kernel
inert; this module reads them back (`ip -s xfrm state`, root) and turns each IKE-keyed netdev
tunnel into an EspTunnel for the engine. Pure: listings in, tunnels out.

An SA is used only if it is inert (has a mark): a live kernel SA would also be used by the kernel,
which picks its own IVs under the same key. Of several matching SAs (a rekey in progress), the
newest (`add` time of `ip -s`) is used in each direction.
"""

from __future__ import annotations

from collections.abc import Iterable

from .sa import EspTunnel, IkeTunnel, Invalid, SaConfig
from .xfrm import KnownSa

WAITING = "waiting for IKE: no inert (marked) transport SA for it in the kernel yet"


def _matches(sa: KnownSa, src: str, dst: str, tunnel: IkeTunnel) -> bool:
    return (sa.src == src and sa.dst == dst and sa.mode == "transport" and sa.sel_proto == tunnel.protocol
            and sa.sel_dport == tunnel.dst_port)


def _newest(sas: Iterable[KnownSa]) -> KnownSa | None:
    ordered = sorted(sas, key=lambda sa: (sa.added or "", sa.spi))
    return ordered[-1] if ordered else None


def tunnels_from_kernel(ike: tuple[IkeTunnel, ...], sas: list[KnownSa]) -> tuple[tuple[EspTunnel, ...],
                                                                                 tuple[Invalid, ...]]:
    """(tunnels with both SAs, tunnels still waiting or refused, with the reason)."""
    tunnels, waiting = [], []
    for tunnel in ike:
        local, remote = str(tunnel.local_ip), str(tunnel.remote_ip)
        out = [sa for sa in sas if _matches(sa, local, remote, tunnel)]
        into = [sa for sa in sas if _matches(sa, remote, local, tunnel)]
        live = [sa for sa in out + into if sa.mark is None]
        esn = [sa for sa in out + into if sa.esn]
        if esn:
            waiting.append(Invalid(tunnel.name, (
                f"tunnel {tunnel.name}: the kernel's SA 0x{esn[0].spi:08x} for it uses extended sequence numbers, "
                "which userspace ESP does not implement: leave esn out of the ESP proposals")))
            continue
        if live:
            waiting.append(Invalid(tunnel.name, (
                f"tunnel {tunnel.name}: the kernel's SA 0x{live[0].spi:08x} for it is live (no mark): the IKE "
                "daemon must install these SAs with policies = no and mark_in/mark_out, so that only "
                "userspace uses them")))
            continue
        outbound, inbound = _newest(out), _newest(into)
        if outbound is None or inbound is None:
            waiting.append(Invalid(tunnel.name, f"tunnel {tunnel.name}: {WAITING}", state="pending"))
            continue
        tunnels.append(EspTunnel(
            name=tunnel.name, kind=tunnel.kind, local_ip=tunnel.local_ip, remote_ip=tunnel.remote_ip,
            dst_port=tunnel.dst_port, outbound=SaConfig(outbound.spi, outbound.key),
            inbound=SaConfig(inbound.spi, inbound.key), replay_window=tunnel.replay_window, bridge=tunnel.bridge,
            fresh_keys=True))
    return tuple(tunnels), tuple(waiting)
