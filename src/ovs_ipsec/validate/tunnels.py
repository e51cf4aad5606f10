"""Every rule a tunnel must pass before anything reaches the IKE daemon, and its message.

Pure: OVSDB rows and certificate facts in, typed tunnels and reasons out. Upstream's messages are
kept where upstream had one (operators grep for them); every other message names the option and
the problem, quoting the operator's value escaped (`text.shown`). One tunnel's mistake never
affects another tunnel: each row is validated inside its own fence.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import replace
from functools import partial

from ..model import (
    DEFAULT_PORTS,
    USERSPACE_DATAPATH,
    AuthMethod,
    DesiredState,
    GlobalConfig,
    InterfaceRow,
    Invalid,
    Tunnel,
    TunnelState,
    TunnelType,
    ValidatedState,
)
from ..pki.inspect import cert_problems
from ..text import shown
from . import fields
from .certificates import CertificateFacts, LocalIdentity, is_ipsec_interface, local_identity
from .fields import Reject
from .guard import guard_config
from .options import ike_options


def validate(desired: DesiredState, facts: CertificateFacts, now: float,
             memo: dict[InterfaceRow, Tunnel | Invalid] | None = None) -> ValidatedState:
    """Validate every IPsec interface; one tunnel's problem never affects another.

    `memo` lets a caller reuse per-row results while the global configuration, the certificate
    facts and the hour stay the same: a change to one row of thousands then costs one check.
    """
    local, global_problem = local_identity(desired.global_config, facts, now)
    memo = {} if memo is None else memo
    tunnels: list[Tunnel] = []
    invalid: list[Invalid] = []
    claimed: dict[tuple, str] = {}
    for row in desired.interfaces:
        result = memo.get(row)
        if result is None:
            options = dict(row.options)
            if not is_ipsec_interface(options):
                continue
            result = memo[row] = validate_row(row, options, desired.global_config, local, global_problem, facts, now)
        if isinstance(result, Tunnel):
            owner = claimed.setdefault((result.local_ip, result.remote_ip, result.selectors), result.name)
            if owner != result.name:
                invalid.append(invalid_row(row, f"tunnel {shown(owner)} already encrypts the same traffic "
                                           "(same addresses, protocol and port); one IPsec policy cannot serve both"))
                continue
            tunnels.append(result)
        else:
            invalid.append(result)
    return ValidatedState(tuple(tunnels), tuple(invalid), global_problem,
                          guard_config(desired.global_config, desired.interfaces))


def validate_row(row: InterfaceRow, options: Mapping[str, str], config: GlobalConfig, local: LocalIdentity | None,
                 global_problem: str | None, facts: CertificateFacts, now: float) -> Tunnel | Invalid:
    """One row, fenced: a rule that refuses it, or a bug in a rule, makes only this row invalid."""
    if row.userspace_datapath:
        return unprotected_row(row)
    try:
        return _tunnel(row, options, config, local, global_problem, facts, now)
    except Reject as reject:
        return invalid_row(row, str(reject))
    except Exception as exc:  # noqa: BLE001 - a bug must cost one tunnel, not the whole pass
        return invalid_row(row, f"could not be validated ({type(exc).__name__}); this is a bug, please report it")


def _tunnel(row: InterfaceRow, options: Mapping[str, str], config: GlobalConfig, local: LocalIdentity | None,
            global_problem: str | None, facts: CertificateFacts, now: float) -> Tunnel:
    fields.name(row.name, "interface name")
    try:
        tunnel_type = TunnelType(row.type)
    except ValueError:
        supported = ", ".join(t.value for t in TunnelType)
        raise Reject(f"type {shown(row.type)} cannot be encrypted (supported: {supported})") from None
    remote_ip = _address(options, "remote_ip")
    if remote_ip is None:
        raise Reject("'remote_ip' is not set")
    local_ip = _address(options, "local_ip")
    family = ipaddress.ip_address(remote_ip).version
    if local_ip is not None and ipaddress.ip_address(local_ip).version != family:
        raise Reject(f"'local_ip' {local_ip} and 'remote_ip' {remote_ip} are not of the same address family")
    if tunnel_type is TunnelType.IP6GRE and family != 6:
        raise Reject(f"type 'ip6gre' needs an IPv6 'remote_ip', not {remote_ip}")
    tunnel = partial(Tunnel, name=row.name, type=tunnel_type, remote_ip=remote_ip, local_ip=local_ip, family=family,
                     dst_port=_dst_port(tunnel_type, options), options=ike_options(options),
                     ofport=row.ofport, cfm_fault=row.cfm_fault)

    if "psk" in options:
        if "remote_cert" in options or "remote_name" in options:
            raise Reject("'remote_cert' and 'remote_name' must be unset with PSK")
        return tunnel(auth=AuthMethod.PSK, psk=fields.psk(options["psk"]))

    if global_problem or local is None:
        raise Reject(global_problem or "must set 'certificate' as local certificate when using CA-signed "
                     "certificate or self-signed certificate to authenticate peers")
    if "remote_cert" in options:
        remote_cert = fields.path(options["remote_cert"], "remote_cert")
        remote = facts.certs.get(remote_cert)
        if remote is None:
            raise Reject("remote certificate not inspected yet")
        problem = remote.error or cert_problems(remote, now)
        if problem:
            raise Reject(problem)
        remote_name = options.get("remote_name") or remote.cn or ""
        fields.name(remote_name, "'remote_name' (or the CN of 'remote_cert')")
        if remote_name != remote.cn:
            raise Reject(f"'remote_name' {shown(remote_name)} does not match the CN {shown(remote.cn)} "
                         f"of 'remote_cert' {remote_cert}")
        return tunnel(auth=AuthMethod.PEER_CERT, local_name=local.name, remote_name=remote_name,
                      local_cert_pem=local.cert_pem, local_key_pem=local.key_pem, remote_cert_pem=remote.pem)

    remote_name = fields.name(options["remote_name"], "'remote_name'")
    if not config.ca_cert:
        raise Reject("must set 'remote_cert' when using self-signed certificate authentication or "
                     "'ca_cert' when using CA-signed certificate authentication")
    ca = facts.certs[config.ca_cert]
    return tunnel(auth=AuthMethod.CA_CERT, local_name=local.name, remote_name=remote_name,
                  local_cert_pem=local.cert_pem, local_key_pem=local.key_pem, ca_cert_pem=ca.pem)


def _address(options: Mapping[str, str], key: str) -> str | None:
    value = options.get(key)
    if value is None or value == "":
        return None
    return fields.address(value, key)


def _dst_port(tunnel_type: TunnelType, options: Mapping[str, str]) -> int | None:
    if tunnel_type in (TunnelType.GRE, TunnelType.IP6GRE):
        return None
    value = options.get("dst_port")
    return DEFAULT_PORTS[tunnel_type] if value is None else fields.port(value, "dst_port")


def unprotected_row(row: InterfaceRow) -> Invalid:
    """An IPsec tunnel on a userspace-datapath bridge: whatever its options, kernel IPsec cannot
    protect it, so it is never loaded into the IKE daemon and never reported as protected."""
    return replace(invalid_row(row, (
        f"on a bridge with datapath_type={USERSPACE_DATAPATH} (the userspace datapath): its packets leave "
        "below the kernel's IPsec (XFRM), so IKE SAs would not encrypt them; not loaded into the IKE "
        "daemon. Encrypt it with `ovs-ipsec userspace-esp` (options esp_*), or put it on a kernel-datapath "
        "bridge")), state=TunnelState.UNPROTECTED)


def invalid_row(row: InterfaceRow, reason: str) -> Invalid:
    """The row as the operator wrote it (status output escapes it), and why it was refused."""
    options = dict(row.options)
    auth = (AuthMethod.PSK if "psk" in options else
            AuthMethod.PEER_CERT if "remote_cert" in options else AuthMethod.CA_CERT)
    return Invalid(name=row.name, reason=reason, type=row.type, local_ip=options.get("local_ip"),
                   remote_ip=options.get("remote_ip"), auth=auth)
