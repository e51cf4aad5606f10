"""The values that flow through the daemon: what OVSDB says, what is valid, what the IKE daemon has.

Everything here is a frozen dataclass or an enum, so a snapshot can cross threads and be compared
cheaply: the reconciler detects changes by equality, never by tracking events.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Set as AbstractSet
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


class TunnelState(enum.StrEnum):
    INVALID = "invalid"  # configuration rejected; never reaches the IKE daemon
    PENDING = "pending"  # valid, not yet loaded into the IKE daemon
    LOADED = "loaded"  # connection loaded, no IKE SA up
    ESTABLISHED = "established"  # an IKE SA for this tunnel is up
    ERROR = "error"  # the IKE daemon refused an action; retried with backoff


@dataclass(frozen=True)
class InterfaceRow:
    """One OVSDB Interface row, copied out of the IDL as plain values."""

    name: str
    type: str
    options: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    ofport: int | None = None
    cfm_fault: bool | None = None

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
    forceencaps: bool = False
    ike_options: tuple[tuple[str, str], ...] = ()  # allow-listed ipsec_* options, sorted
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


@dataclass(frozen=True)
class ValidatedState:
    tunnels: tuple[Tunnel, ...]
    invalid: tuple[Invalid, ...]
    global_problem: str | None = None  # e.g. unreadable local certificate; affects cert tunnels


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
