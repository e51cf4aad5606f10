"""The values that flow through the daemon: what OVSDB says, what is valid, what the IKE daemon has.

Everything here is a frozen dataclass or an enum, so a snapshot can cross threads and be compared
cheaply: the reconciler detects changes by equality, never by tracking events.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field


class TunnelType(enum.StrEnum):
    GRE = "gre"
    IP6GRE = "ip6gre"
    GENEVE = "geneve"
    VXLAN = "vxlan"
    STT = "stt"


class AuthMethod(enum.StrEnum):
    PSK = "psk"
    PEER_CERT = "peer-cert"  # self-signed: options:remote_cert pins the peer's certificate
    CA_CERT = "ca-cert"  # options:remote_name + other_config:ca_cert


# Bridge datapath_type of OVS's userspace datapath (OVS-DPDK, AF_XDP, AF_PACKET ports): it outputs
# tunnel packets below the kernel's IP stack, so kernel XFRM policies never see them.
USERSPACE_DATAPATH = "netdev"


class TunnelState(enum.StrEnum):
    INVALID = "invalid"  # configuration rejected; never reaches the IKE daemon
    PENDING = "pending"  # valid, not yet loaded into the IKE daemon
    LOADED = "loaded"  # connection loaded, no IKE SA up
    NEGOTIATING = "negotiating"  # an IKE SA is up, but not every child SA of the tunnel: not encrypting yet
    ESTABLISHED = "established"  # every child SA of the tunnel is installed: its traffic is encrypted
    ERROR = "error"  # the IKE daemon refused an action; retried with backoff
    # On a userspace-datapath bridge (datapath_type=netdev): its packets never pass the kernel's
    # XFRM, so kernel IPsec cannot protect it whatever the IKE daemon negotiates. Never loaded.
    UNPROTECTED = "unprotected"


@dataclass(frozen=True)
class InterfaceRow:
    """One OVSDB Interface row, copied out of the IDL as plain values."""

    name: str
    type: str
    options: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    ofport: int | None = None
    cfm_fault: bool | None = None
    # datapath_type of the Bridge whose Port holds this Interface ("" is the kernel's, as "system");
    # None when no bridge holds it.
    datapath_type: str | None = None

    @property
    def userspace_datapath(self) -> bool:
        return self.datapath_type == USERSPACE_DATAPATH

    def option(self, key: str) -> str | None:
        return dict(self.options).get(key)


@dataclass(frozen=True)
class GlobalConfig:
    """Open_vSwitch other_config keys that apply to every tunnel."""

    certificate: str | None = None
    private_key: str | None = None
    ca_cert: str | None = None
    skb_mark: str | None = None


@dataclass(frozen=True)
class DesiredState:
    """Everything the operator asked for, as read from OVSDB in one snapshot."""

    global_config: GlobalConfig
    interfaces: tuple[InterfaceRow, ...]


@dataclass(frozen=True)
class Selector:
    """One direction-pair of traffic a tunnel puts on the wire: protocol and ports."""

    protocol: str  # "gre" | "udp" | "tcp"
    local_port: int | None = None
    remote_port: int | None = None


@dataclass(frozen=True)
class IkeOptions:
    """A tunnel's `ipsec_*` options, parsed (validate/options.py); None: not set, the backend's
    default applies. Durations are seconds and proposals tuples of validated tokens: renderers
    format them for their daemon and never see the operator's text.
    """

    ike: tuple[str, ...] | None = None  # IKE proposals
    esp: tuple[str, ...] | None = None  # ESP proposals
    forceencaps: bool = False  # always UDP-encapsulate (strongSwan forceencaps, LibreSwan encapsulation)
    dpd_delay: int | None = None
    dpd_timeout: int | None = None
    ike_lifetime: int | None = None
    sa_lifetime: int | None = None
    rekey_margin: int | None = None
    rekey_fuzz: int | None = None  # percent
    replay_window: int | None = None  # packets
    pfs: bool | None = None
    esn: str | None = None  # yes | no | either
    retransmit_timeout: int | None = None
    nat_keepalive: bool | None = None
    mobike: bool | None = None
    fragmentation: str | None = None  # yes | no | accept | force
    keyingtries: int | None = None  # 0: without end
    # Keys that were set but have no effect with this monitor, each with the reason; sent nowhere.
    ignored: tuple[tuple[str, str], ...] = ()

    def in_force(self) -> tuple[tuple[str, str], ...]:
        """The options set, as (name, canonical value) pairs, for status output."""
        pairs = []
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.name == "ignored" or value is None or (spec.name == "forceencaps" and not value):
                continue
            if isinstance(value, bool):
                text = "yes" if value else "no"
            elif isinstance(value, tuple):
                text = ",".join(value)
            else:
                text = f"{value}s" if spec.name in DURATION_OPTIONS else str(value)
            pairs.append((spec.name, text))
        return tuple(pairs)


DURATION_OPTIONS = frozenset({"dpd_delay", "dpd_timeout", "ike_lifetime", "sa_lifetime", "rekey_margin",
                              "retransmit_timeout"})


@dataclass(frozen=True)
class Tunnel:
    """A validated IPsec tunnel: every field is safe to hand to an IKE daemon."""

    name: str
    type: TunnelType
    remote_ip: str
    local_ip: str | None  # None: the IKE daemon picks the source address
    family: int  # 4 or 6
    auth: AuthMethod
    dst_port: int | None  # UDP/TCP port of the tunnel protocol; None for GRE
    psk: str | None = field(default=None, repr=False)
    local_name: str | None = None  # CN of the local certificate (certificate modes)
    remote_name: str | None = None  # expected peer identity (certificate modes)
    local_cert_pem: bytes | None = field(default=None, repr=False)
    local_key_pem: bytes | None = field(default=None, repr=False)
    remote_cert_pem: bytes | None = field(default=None, repr=False)  # peer-cert mode
    ca_cert_pem: bytes | None = field(default=None, repr=False)  # ca-cert mode
    options: IkeOptions = IkeOptions()
    ofport: int | None = None
    cfm_fault: bool | None = None

    @functools.cached_property  # works on a frozen dataclass: it writes __dict__ directly
    def selectors(self) -> tuple[Selector, ...]:
        """The traffic this tunnel must encrypt, both directions.

        UDP and TCP tunnels need two selectors because the source port of outgoing packets is
        random: "out" matches the peer's port as destination, "in" matches ours as source.
        """
        if self.type in (TunnelType.GRE, TunnelType.IP6GRE):
            return (Selector("gre"),)
        protocol = "tcp" if self.type is TunnelType.STT else "udp"
        return (
            Selector(protocol, remote_port=self.dst_port),
            Selector(protocol, local_port=self.dst_port),
        )


@dataclass(frozen=True)
class Invalid:
    """A tunnel that was rejected, with the reason an operator needs to fix it."""

    name: str
    reason: str
    type: str = ""
    local_ip: str | None = None
    remote_ip: str | None = None
    auth: AuthMethod | None = None
    state: TunnelState = TunnelState.INVALID  # or UNPROTECTED: valid or not, IKE cannot protect it


@dataclass(frozen=True)
class GuardConfig:
    """other_config:ipsec_skb_mark and the tunnel traffic on this host, for the plaintext guard."""

    configured: str | None = None  # the value as written (may be malformed; shown escaped)
    mark: SkbMark | None = None  # None: guard off, or `error`
    error: str | None = None  # why `configured` is malformed: the guard keeps its previous mode
    # (protocol, destination port) of every tunnel Interface, IPsec or not: in a mode like 0/1
    # unmarked packets of non-IPsec tunnels are dropped too, as the seeds describe.
    traffic: frozenset[tuple[str, int | None]] = frozenset()
    # IPsec tunnels on the userspace datapath: their packets never meet an XFRM policy, guard or not.
    uncovered: tuple[str, ...] = ()


@dataclass(frozen=True)
class ValidatedState:
    tunnels: tuple[Tunnel, ...]
    invalid: tuple[Invalid, ...]
    global_problem: str | None = None  # e.g. unreadable local certificate; affects cert tunnels
    guard: GuardConfig = GuardConfig()
    # Invalid tunnels whose last good configuration is still in force (inforce.py), and since when;
    # their last good Tunnel is among `tunnels`.
    kept: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ObservedSA:
    """An IKE SA as the IKE daemon reports it."""

    conn_name: str
    unique_id: str
    state: str  # e.g. ESTABLISHED, CONNECTING
    established_seconds: int | None
    installed_children: tuple[str, ...]  # child config names with an INSTALLED CHILD_SA

    @property
    def established(self) -> bool:
        return self.state == "ESTABLISHED"

    @property
    def child_sas_installed(self) -> int:
        return len(self.installed_children)


@dataclass(frozen=True)
class ObservedState:
    """What the IKE daemon holds: only objects carrying our ownership marker are listed."""

    conns: Mapping[str, frozenset[str]]  # connection name -> names of its child configs
    shared_secrets: AbstractSet[str]
    sas: Mapping[str, tuple[ObservedSA, ...]]  # connection name -> its IKE SAs
    # Which run of the IKE daemon this is (e.g. its start time): a new value means it restarted
    # and lost every SA. Set by full observations; None where the backend cannot tell.
    daemon_id: str | None = None

    def sas_of(self, conn_name: str) -> tuple[ObservedSA, ...]:
        return self.sas.get(conn_name, ())


def wire_traffic(tunnel_type: TunnelType, dst_port: int | None) -> tuple[str, int | None]:
    """The protocol and destination port a tunnel's packets carry on the wire."""
    if tunnel_type in (TunnelType.GRE, TunnelType.IP6GRE):
        return ("gre", None)
    return ("tcp" if tunnel_type is TunnelType.STT else "udp", dst_port)


DEFAULT_PORTS = {
    TunnelType.GENEVE: 6081,
    TunnelType.VXLAN: 4789,
    TunnelType.STT: 7471,
}


@dataclass(frozen=True, order=True)
class SkbMark:
    """other_config:ipsec_skb_mark as numbers: a packet matches when (its mark & mask) == value."""

    value: int
    mask: int

    def __str__(self) -> str:
        return f"{_mark_number(self.value)}/{_mark_number(self.mask)}"


def _mark_number(number: int) -> str:
    return str(number) if number < 10 else f"{number:#x}"
