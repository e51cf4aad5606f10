"""Every rule a tunnel must pass before anything reaches the IKE daemon, and its message.

Pure: OVSDB rows and certificate facts in, valid tunnels and reasons out. Upstream's messages are
kept where upstream had one (operators grep for them); every other message names the option and
the problem. One tunnel's mistake never affects another tunnel.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .model import (
    DEFAULT_PORTS,
    AuthMethod,
    DesiredState,
    GlobalConfig,
    InterfaceRow,
    Invalid,
    SkbMark,
    Tunnel,
    TunnelType,
    ValidatedState,
)
from .pki.inspect import CertFacts, KeyFacts, cert_problems, key_matches

AUTH_KEYS = ("psk", "remote_cert", "remote_name")

_PROPOSALS = re.compile(r"^[A-Za-z0-9_+!-]+(,[A-Za-z0-9_+!-]+)*$")
_DURATION = re.compile(r"^[0-9]{1,9}[smhd]?$")
_BOOLEAN = re.compile(r"^(yes|no|true|false)$")
_NUMBER = re.compile(r"^[0-9]{1,9}$")

# ipsec_<key> options an operator (or ovn-controller) may set, and the shape of their values.
# Upstream appended any ipsec_* pair verbatim to the IKE configuration; a newline in a value could
# inject arbitrary directives. Only these keys, with these shapes, ever reach the IKE daemon.
IKE_OPTION_PATTERNS: dict[str, re.Pattern] = {
    "ike": _PROPOSALS,
    "esp": _PROPOSALS,
    "encapsulation": _BOOLEAN,
    "forceencaps": _BOOLEAN,
    "dpd-delay": _DURATION,
    "dpddelay": _DURATION,
    "dpd-timeout": _DURATION,
    "dpdtimeout": _DURATION,
    "ikelifetime": _DURATION,
    "salifetime": _DURATION,
    "lifetime": _DURATION,
    "rekeymargin": _DURATION,
    "replay-window": _NUMBER,
}

# Interface names become part of IKE connection names and log lines.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,200}$")
_UNSAFE_SECRET = re.compile(r'["\x00-\x1f\x7f]')


@dataclass(frozen=True)
class CertificateFacts:
    """What the certificate inspector found, keyed by file path (values, no file access)."""

    certs: Mapping[str, CertFacts] = field(default_factory=dict)
    keys: Mapping[str, KeyFacts] = field(default_factory=dict)
    chains: Mapping[tuple[str, str], str | None] = field(default_factory=dict)  # (cert, ca) -> problem


class _Reject(Exception):
    """Raised inside one tunnel's validation; caught per tunnel so others are unaffected."""


def is_ipsec_interface(row: InterfaceRow) -> bool:
    """Upstream's rule: a tunnel wants IPsec when one of the auth keys is present (value ignored)."""
    options = dict(row.options)
    return any(key in options for key in AUTH_KEYS)


def certificate_paths(desired: DesiredState) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """Which files the inspector must look at for this desired state: (certs, keys, chains)."""
    config = desired.global_config
    certs: set[str] = set()
    keys: set[str] = set()
    chains: set[tuple[str, str]] = set()
    if config.certificate:
        certs.add(config.certificate)
    if config.private_key:
        keys.add(config.private_key)
    if config.ca_cert:
        certs.add(config.ca_cert)
        if config.certificate:
            chains.add((config.certificate, config.ca_cert))
    for row in desired.interfaces:
        remote_cert = row.option("remote_cert")
        if remote_cert and is_ipsec_interface(row):
            certs.add(remote_cert)
    return certs, keys, chains


def validate(desired: DesiredState, facts: CertificateFacts, now: float,
             memo: dict[InterfaceRow, Tunnel | Invalid] | None = None) -> ValidatedState:
    """Validate every IPsec interface; one tunnel's problem never affects another.

    `memo` lets a caller reuse per-row results while the global configuration, the certificate
    facts and the hour stay the same: a change to one row of thousands then costs one check.
    """
    local_identity, global_problem = _local_identity(desired.global_config, facts, now)
    memo = {} if memo is None else memo
    tunnels: list[Tunnel] = []
    invalid: list[Invalid] = []
    claimed: dict[tuple, str] = {}
    for row in desired.interfaces:
        result = memo.get(row)
        if result is None:
            if not is_ipsec_interface(row):
                continue
            try:
                result = _validate_tunnel(row, desired.global_config, local_identity, global_problem, facts, now)
            except _Reject as reject:
                result = _invalid(row, str(reject))
            memo[row] = result
        if isinstance(result, Tunnel):
            owner = claimed.setdefault((result.local_ip, result.remote_ip, result.selectors), result.name)
            if owner != result.name:
                invalid.append(_invalid(row, f"tunnel '{owner}' already encrypts the same traffic (same "
                                        "addresses, protocol and port); one IPsec policy cannot serve both"))
                continue
            tunnels.append(result)
        else:
            invalid.append(result)
    return ValidatedState(tuple(tunnels), tuple(invalid), global_problem)


@dataclass(frozen=True)
class _LocalIdentity:
    name: str
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)


def _local_identity(config: GlobalConfig, facts: CertificateFacts,
                    now: float) -> tuple[_LocalIdentity | None, str | None]:
    """The host's own certificate identity, or why certificate tunnels cannot use it."""
    if not config.certificate and not config.private_key:
        if config.ca_cert:
            return None, "'ca_cert' is set without 'certificate' and 'private_key'"
        return None, None
    if not config.certificate:
        return None, "'private_key' is set but 'certificate' is not"
    if not config.private_key:
        return None, "'certificate' is set but 'private_key' is not"
    cert = facts.certs.get(config.certificate)
    key = facts.keys.get(config.private_key)
    if cert is None or key is None:
        return None, "local certificate not inspected yet"
    problem = cert.error or cert_problems(cert, now) or key.error
    if problem:
        return None, problem
    if not key_matches(cert, key):
        return None, f"private key {config.private_key} does not match certificate {config.certificate}"
    if not cert.cn:
        return None, f"certificate {config.certificate} has no CN"
    if config.ca_cert:
        ca = facts.certs.get(config.ca_cert)
        if ca is None:
            return None, "CA certificate not inspected yet"
        problem = ca.error or cert_problems(ca, now) or facts.chains.get((config.certificate, config.ca_cert))
        if problem:
            return None, problem
    return _LocalIdentity(cert.cn, cert.pem or b"", key.pem or b""), None


def _validate_tunnel(row: InterfaceRow, config: GlobalConfig, local: _LocalIdentity | None,
                     global_problem: str | None, facts: CertificateFacts, now: float) -> Tunnel:
    options = dict(row.options)
    if not _SAFE_NAME.match(row.name):
        raise _Reject("interface name must be 1-200 characters of letters, digits and _ . : @ + -")
    try:
        tunnel_type = TunnelType(row.type)
    except ValueError:
        supported = ", ".join(t.value for t in TunnelType)
        raise _Reject(f"type '{row.type}' cannot be encrypted (supported: {supported})") from None
    remote_ip = _address(options, "remote_ip")
    if remote_ip is None:
        raise _Reject("'remote_ip' is not set")
    local_ip = _address(options, "local_ip")
    family = ipaddress.ip_address(remote_ip).version
    if local_ip is not None and ipaddress.ip_address(local_ip).version != family:
        raise _Reject(f"'local_ip' {local_ip} and 'remote_ip' {remote_ip} are not of the same address family")
    if tunnel_type is TunnelType.IP6GRE and family != 6:
        raise _Reject(f"type 'ip6gre' needs an IPv6 'remote_ip', not {remote_ip}")
    ike_options, forceencaps = _ike_options(options)
    common = dict(name=row.name, type=tunnel_type, remote_ip=remote_ip, local_ip=local_ip, family=family,
                  dst_port=_dst_port(tunnel_type, options), forceencaps=forceencaps,
                  ike_options=ike_options, ofport=row.ofport, cfm_fault=row.cfm_fault)

    if "psk" in options:
        if "remote_cert" in options or "remote_name" in options:
            raise _Reject("'remote_cert' and 'remote_name' must be unset with PSK")
        psk = options["psk"]
        if not psk:
            raise _Reject("'psk' is empty")
        if _UNSAFE_SECRET.search(psk):
            raise _Reject("'psk' contains a double quote or a control character (such as a newline), "
                          "which cannot be passed safely to every IKE daemon")
        return Tunnel(auth=AuthMethod.PSK, psk=psk, **common)

    if global_problem or local is None:
        raise _Reject(global_problem or "must set 'certificate' as local certificate when using CA-signed "
                      "certificate or self-signed certificate to authenticate peers")
    if "remote_cert" in options:
        remote = facts.certs.get(options["remote_cert"])
        if remote is None:
            raise _Reject("remote certificate not inspected yet")
        problem = remote.error or cert_problems(remote, now)
        if problem:
            raise _Reject(problem)
        remote_name = options.get("remote_name") or remote.cn
        if not remote_name or remote_name != remote.cn:
            raise _Reject(f"'remote_name' {remote_name!r} does not match the CN {remote.cn!r} "
                          f"of 'remote_cert' {options['remote_cert']}")
        return Tunnel(auth=AuthMethod.PEER_CERT, local_name=local.name, remote_name=remote_name,
                      local_cert_pem=local.cert_pem, local_key_pem=local.key_pem,
                      remote_cert_pem=remote.pem, **common)

    remote_name = options["remote_name"]
    if not _SAFE_NAME.match(remote_name):
        raise _Reject(f"'remote_name' {remote_name!r} is not a valid certificate name")
    if not config.ca_cert:
        raise _Reject("must set 'remote_cert' when using self-signed certificate authentication or "
                      "'ca_cert' when using CA-signed certificate authentication")
    ca = facts.certs[config.ca_cert]
    return Tunnel(auth=AuthMethod.CA_CERT, local_name=local.name, remote_name=remote_name,
                  local_cert_pem=local.cert_pem, local_key_pem=local.key_pem, ca_cert_pem=ca.pem, **common)


def _address(options: dict[str, str], key: str) -> str | None:
    value = options.get(key)
    if value is None or value == "":
        return None
    if value == "flow":
        raise _Reject(f"'{key}=flow' cannot be encrypted: IPsec needs a fixed peer address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _Reject(f"'{key}' {value!r} is not an IP address") from None


def _dst_port(tunnel_type: TunnelType, options: dict[str, str]) -> int | None:
    if tunnel_type in (TunnelType.GRE, TunnelType.IP6GRE):
        return None
    value = options.get("dst_port")
    if value is None:
        return DEFAULT_PORTS[tunnel_type]
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise _Reject(f"'dst_port' {value!r} is not a port number")
    return int(value)


def _ike_options(options: dict[str, str]) -> tuple[tuple[tuple[str, str], ...], bool]:
    chosen = []
    for key, value in sorted(options.items()):
        if not key.startswith("ipsec_"):
            continue
        name = key[len("ipsec_"):].replace("_", "-")  # dpd_delay and dpd-delay both appear in the wild
        pattern = IKE_OPTION_PATTERNS.get(name)
        if pattern is None:
            supported = ", ".join(f"ipsec_{k}" for k in sorted(IKE_OPTION_PATTERNS))
            raise _Reject(f"option '{key}' is not supported (supported: {supported})")
        if not pattern.match(value):
            raise _Reject(f"option '{key}' has an invalid value {value!r}")
        chosen.append((name, value))
    # LibreSwan's `encapsulation` and strongSwan's `forceencaps` mean the same thing: always UDP-encapsulate.
    forceencaps = any(name in ("encapsulation", "forceencaps") and value in ("yes", "true") for name, value in chosen)
    return tuple(chosen), forceencaps


_MARK_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]{1,8}|[0-9]{1,10})$")


def parse_skb_mark(text: str) -> SkbMark:
    """other_config:ipsec_skb_mark `value/mask` (or `value`, mask 0xffffffff), decimal or 0x hex.

    Raises ValueError with the message an operator needs. The value must fit in the mask: a bit
    of the value outside the mask could never match, and the guard would silently block nothing.
    """
    usage = "expected value/mask such as 0/1 or 1/1, each a 32-bit number in decimal or 0x hex"
    value_text, slash, mask_text = text.strip().partition("/")
    if not slash:
        mask_text = "0xffffffff"
    numbers = []
    for part, what in ((value_text, "value"), (mask_text, "mask")):
        part = part.strip()
        if not _MARK_NUMBER.match(part):
            raise ValueError(f"other_config:ipsec_skb_mark {text!r}: {what} {part!r} is not a number ({usage})")
        number = int(part, 0) if part.lower().startswith("0x") else int(part)
        if number > 0xFFFFFFFF:
            raise ValueError(f"other_config:ipsec_skb_mark {text!r}: {what} {part!r} does not fit in 32 bits ({usage})")
        numbers.append(number)
    value, mask = numbers
    if value & ~mask:
        raise ValueError(f"other_config:ipsec_skb_mark {text!r}: value {value:#x} has bits outside mask {mask:#x}, "
                         "so no packet could ever match it")
    return SkbMark(value, mask)


def _invalid(row: InterfaceRow, reason: str) -> Invalid:
    options = dict(row.options)
    auth = (AuthMethod.PSK if "psk" in options else
            AuthMethod.PEER_CERT if "remote_cert" in options else AuthMethod.CA_CERT)
    return Invalid(name=row.name, reason=reason, type=row.type, local_ip=options.get("local_ip"),
                   remote_ip=options.get("remote_ip"), auth=auth)
