"""Manual SAs from OVSDB: typed, validated configuration of the userspace ESP tunnels. Pure.

An Interface opts in with the options of the ovs-dev `esp` series (keys in the format of
`ip xfrm state ... aead 'rfc4106(gcm(aes))' 0x<key||salt> 128`):

    ovs-vsctl set interface vx0 options:esp_out_spi=0x1001 options:esp_in_spi=0x1002 \\
        options:esp_out_key=0x<40|56|72 hex digits> options:esp_in_key=0x<...>

Every OVSDB string is untrusted: each value must match its allow-list in full (re.fullmatch) before
it is used, and a reason never quotes a value that failed one (nor any key, valid or not). A
reason names the tunnel (when its name is safe to print) and the option. One tunnel's mistake
never affects another, except where two tunnels collide (same traffic, same SPI, same key): then
both are refused, since neither can be chosen safely.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .esp import AeadKey

# The options this process reads. Nothing else named esp_* is accepted (a typo must not pass).
OPTION_OUT_SPI = "esp_out_spi"
OPTION_IN_SPI = "esp_in_spi"
OPTION_OUT_KEY = "esp_out_key"
OPTION_IN_KEY = "esp_in_key"
OPTION_REPLAY_WINDOW = "esp_replay_window"
REQUIRED_OPTIONS = (OPTION_OUT_SPI, OPTION_IN_SPI, OPTION_OUT_KEY, OPTION_IN_KEY)
KNOWN_OPTIONS = (*REQUIRED_OPTIONS, OPTION_REPLAY_WINDOW)
# IKE options of the monitor: a tunnel is keyed one way or the other, never both.
IKE_OPTIONS = ("psk", "remote_cert", "remote_name")

TUNNEL_PROTOCOLS = {"vxlan": 17, "geneve": 17, "gre": 47}
DEFAULT_PORTS = {"vxlan": 4789, "geneve": 6081}
DEFAULT_REPLAY_WINDOW = 64
REPLAY_WINDOW_RANGE = (32, 4096)

_NAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,64}")
_OPTION_KEY = re.compile(r"esp_[a-z0-9_]{1,32}")
_SPI = re.compile(r"0x[0-9a-fA-F]{1,8}|[1-9][0-9]{0,9}")
# key||salt: AES-128, -192 or -256 plus the 4-byte salt, as `ip xfrm` takes it.
_KEY = re.compile(r"0x(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{56}|[0-9a-fA-F]{72})")
_WINDOW = re.compile(r"[0-9]{1,4}")
_PORT = re.compile(r"[0-9]{1,5}")
_ADDRESS = re.compile(r"[0-9a-fA-F:.]{2,45}")
_DATAPATH_TYPE = re.compile(r"[a-z]{1,16}")
_TUNNEL_TYPE = re.compile(r"[a-z0-9]{1,16}")


@dataclass(frozen=True)
class TunnelRow:
    """What the reader copies out of OVSDB for one Interface (plain values, unvalidated)."""

    uuid: str
    name: str
    type: str
    options: tuple[tuple[str, str], ...]
    bridge: str | None = None  # the Bridge whose Port holds this Interface
    datapath_type: str | None = None  # that bridge's datapath_type ("" means system)

    def option(self, key: str) -> str | None:
        return dict(self.options).get(key)


@dataclass(frozen=True)
class SaConfig:
    """One direction's SA: SPI and key material. repr shows the SPI only."""

    spi: int
    key: AeadKey = field(repr=False)


@dataclass(frozen=True)
class EspTunnel:
    """A validated userspace ESP tunnel: every field is safe to use and to print (keys aside)."""

    name: str
    kind: str  # vxlan | geneve | gre
    local_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst_port: int | None  # the UDP port on the wire; None for GRE
    outbound: SaConfig
    inbound: SaConfig
    replay_window: int = DEFAULT_REPLAY_WINDOW
    bridge: str = ""
    # Keys negotiated by IKE for this SA alone (keysource.py): the IV sequence may start at 1,
    # no reservation needed. Manual keys (False) outlive restarts: see seqstore.py.
    fresh_keys: bool = False

    @property
    def protocol(self) -> int:
        return TUNNEL_PROTOCOLS[self.kind]

    @property
    def family(self) -> int:
        return self.local_ip.version

    @property
    def selector(self) -> tuple:
        """The traffic this tunnel's SAs carry; two tunnels must never share one."""
        return (self.local_ip, self.remote_ip, self.protocol, self.dst_port)


@dataclass(frozen=True)
class IkeTunnel:
    """A netdev tunnel keyed by IKE (options:psk, remote_cert or remote_name): its SAs are
    negotiated by the IKE daemon and read from the kernel (keysource.py)."""

    name: str
    kind: str
    local_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst_port: int | None
    replay_window: int = DEFAULT_REPLAY_WINDOW
    bridge: str = ""

    @property
    def protocol(self) -> int:
        return TUNNEL_PROTOCOLS[self.kind]


@dataclass(frozen=True)
class Invalid:
    name: str  # the interface name if it is safe to print, else a placeholder with its UUID
    reason: str
    state: str = "invalid"  # or "pending": valid, waiting for its SAs (IKE)


@dataclass(frozen=True)
class EspConfig:
    tunnels: tuple[EspTunnel, ...] = ()
    invalid: tuple[Invalid, ...] = ()


class _Reject(Exception):
    pass


def wants_userspace_esp(row: TunnelRow) -> bool:
    """Any esp_* option makes a tunnel ours (a partial configuration is reported, not ignored)."""
    return any(key.startswith("esp_") for key, _ in row.options)


def printable_name(row: TunnelRow) -> str:
    if _NAME.fullmatch(row.name):
        return row.name
    uuid = row.uuid if re.fullmatch(r"[0-9a-f-]{36}", row.uuid) else "?"
    return f"<interface {uuid}>"


def validate(rows: tuple[TunnelRow, ...] | list[TunnelRow]) -> EspConfig:
    """Every row that asks for userspace ESP, as a tunnel or as a reason it is refused."""
    tunnels: list[EspTunnel] = []
    invalid: list[Invalid] = []
    for row in sorted(rows, key=lambda r: (r.name, r.uuid)):
        if not wants_userspace_esp(row):
            continue
        name = printable_name(row)
        try:
            tunnels.append(_tunnel(row, name))
        except _Reject as exc:
            invalid.append(Invalid(name, f"tunnel {name}: {exc}"))
    tunnels, collided = _without_collisions(tunnels)
    return EspConfig(tuple(tunnels), tuple(invalid + collided))


def validate_ike(rows: tuple[TunnelRow, ...] | list[TunnelRow]) -> tuple[tuple[IkeTunnel, ...], tuple[Invalid, ...]]:
    """Netdev tunnels with IKE options and no esp_* options (those with both are refused by
    validate()). Tunnels on kernel-datapath bridges are the monitor's, not ours: skipped."""
    tunnels, invalid = [], []
    for row in sorted(rows, key=lambda r: (r.name, r.uuid)):
        if wants_userspace_esp(row) or not any(row.option(key) is not None for key in IKE_OPTIONS):
            continue
        if (row.datapath_type or "system") != "netdev":
            continue
        name = printable_name(row)
        try:
            kind = _common(row)
            local_ip, remote_ip = _address(row, "local_ip"), _address(row, "remote_ip")
            if local_ip.version != remote_ip.version:
                raise _Reject("options:local_ip and options:remote_ip are of different address families")
            tunnels.append(IkeTunnel(row.name, kind, local_ip, remote_ip, _port(row, kind), _replay_window(row),
                                     row.bridge or ""))
        except _Reject as exc:
            invalid.append(Invalid(name, f"tunnel {name}: {exc}"))
    return tuple(tunnels), tuple(invalid)


def _common(row: TunnelRow) -> str:
    """The checks every tunnel of ours passes first; returns its type."""
    if not _NAME.fullmatch(row.name):
        raise _Reject("the interface name must be 1-64 of A-Z a-z 0-9 _ . : @ + -")
    for key, _ in row.options:
        if key.startswith("esp_") and key not in KNOWN_OPTIONS:
            shown = f"options:{key}" if _OPTION_KEY.fullmatch(key) else "an esp_ option with an unprintable name"
            raise _Reject(f"{shown} is not a userspace ESP option (known: {', '.join(KNOWN_OPTIONS)})")
    kind = row.type if _TUNNEL_TYPE.fullmatch(row.type) else ""
    if kind not in TUNNEL_PROTOCOLS:
        shown = f"type {kind}" if kind else "its type"
        raise _Reject(f"{shown} is not supported by userspace ESP (vxlan, geneve or gre)")
    if row.bridge is None:
        raise _Reject("is not on a bridge (no Port holds it)")
    datapath = row.datapath_type or "system"
    if datapath != "netdev":
        shown = datapath if _DATAPATH_TYPE.fullmatch(datapath) else "not netdev"
        bridge = row.bridge if _NAME.fullmatch(row.bridge) else "its bridge"
        raise _Reject(f"is on bridge {bridge} with datapath_type {shown}: userspace ESP protects tunnels "
                      "of the userspace (netdev) datapath only; kernel datapath tunnels use kernel IPsec")
    return kind


def _tunnel(row: TunnelRow, name: str) -> EspTunnel:
    kind = _common(row)
    present = [key for key in IKE_OPTIONS if row.option(key) is not None]
    if present:
        raise _Reject(f"has both manual ESP keys and options:{present[0]} (IKE); configure one or the other")
    missing = [key for key in REQUIRED_OPTIONS if row.option(key) is None]
    if missing:
        raise _Reject(f"options:{missing[0]} is missing (userspace ESP needs {', '.join(REQUIRED_OPTIONS)})")
    local_ip = _address(row, "local_ip")
    remote_ip = _address(row, "remote_ip")
    if local_ip.version != remote_ip.version:
        raise _Reject("options:local_ip and options:remote_ip are of different address families")
    outbound = SaConfig(_spi(row, OPTION_OUT_SPI), _key(row, OPTION_OUT_KEY))
    inbound = SaConfig(_spi(row, OPTION_IN_SPI), _key(row, OPTION_IN_KEY))
    if outbound.key.key == inbound.key.key:
        # Our IVs are sequence numbers: one key in both directions could repeat a nonce.
        raise _Reject(f"options:{OPTION_IN_KEY} and options:{OPTION_OUT_KEY} must be different keys")
    return EspTunnel(name=row.name, kind=kind, local_ip=local_ip, remote_ip=remote_ip,
                     dst_port=_port(row, kind), outbound=outbound, inbound=inbound,
                     replay_window=_replay_window(row), bridge=row.bridge or "")


def _address(row: TunnelRow, option: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    value = row.option(option)
    if value is None:
        raise _Reject(f"options:{option} is missing (userspace ESP needs literal local_ip and remote_ip)")
    if not _ADDRESS.fullmatch(value):
        raise _Reject(f"options:{option} must be a literal IPv4 or IPv6 address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise _Reject(f"options:{option} must be a literal IPv4 or IPv6 address") from None
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        raise _Reject(f"options:{option} must be a unicast address")
    return address


def _spi(row: TunnelRow, option: str) -> int:
    value = row.option(option) or ""
    if not _SPI.fullmatch(value):
        raise _Reject(f"options:{option} must be a number, decimal or 0x-hexadecimal, of at most 32 bits")
    spi = int(value, 0)
    if not 256 <= spi <= 0xFFFFFFFF:
        raise _Reject(f"options:{option} must be from 256 to 4294967295 (0-255 are reserved, RFC 4303 2.1)")
    return spi


def _key(row: TunnelRow, option: str) -> AeadKey:
    value = row.option(option) or ""
    if not _KEY.fullmatch(value):
        raise _Reject(f"options:{option} must be 0x and 40, 56 or 72 hex digits: an AES-128, -192 or -256 "
                      "key and its 4-byte salt, as ip xfrm's aead 'rfc4106(gcm(aes))' takes them")
    return AeadKey.from_material(bytes.fromhex(value[2:]))


def _port(row: TunnelRow, kind: str) -> int | None:
    if kind == "gre":
        return None
    value = row.option("dst_port")
    if value is None:
        return DEFAULT_PORTS[kind]
    if not _PORT.fullmatch(value) or not 1 <= int(value) <= 65535:
        raise _Reject("options:dst_port must be a port number from 1 to 65535")
    return int(value)


def _replay_window(row: TunnelRow) -> int:
    value = row.option(OPTION_REPLAY_WINDOW)
    if value is None:
        return DEFAULT_REPLAY_WINDOW
    low, high = REPLAY_WINDOW_RANGE
    if not _WINDOW.fullmatch(value) or not low <= int(value) <= high:
        raise _Reject(f"options:{OPTION_REPLAY_WINDOW} must be a number of packets from {low} to {high}")
    return int(value)


def _without_collisions(tunnels: list[EspTunnel]) -> tuple[list[EspTunnel], list[Invalid]]:
    """Refuse every tunnel that shares its traffic selector, an inbound SPI or key material with
    another: the datapath could not tell them apart, or would repeat a GCM nonce."""
    clashes: dict[str, str] = {}

    def mark(groups: dict, what: str) -> None:
        for members in groups.values():
            if len(members) > 1:
                for tunnel in members:
                    others = ", ".join(t.name for t in members if t is not tunnel)
                    clashes.setdefault(tunnel.name, f"tunnel {tunnel.name}: {what} as tunnel {others}")

    selectors: dict = {}
    spis: dict = {}
    keys: dict = {}
    for tunnel in tunnels:
        selectors.setdefault(tunnel.selector, []).append(tunnel)
        spis.setdefault((tunnel.local_ip, tunnel.inbound.spi), []).append(tunnel)
        for sa in (tunnel.outbound, tunnel.inbound):
            keys.setdefault(sa.key.key, []).append(tunnel)
    mark(selectors, "carries the same traffic (addresses, protocol and port)")
    mark(spis, f"uses the same options:{OPTION_IN_SPI} on the same local_ip")
    mark(keys, "uses the same ESP key")
    kept = [t for t in tunnels if t.name not in clashes]
    return kept, [Invalid(t.name, clashes[t.name]) for t in tunnels if t.name in clashes]
