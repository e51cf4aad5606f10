"""The certificate side of validation: which files to inspect, and the host's own identity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..model import DesiredState, GlobalConfig, InterfaceRow
from ..pki.inspect import CertFacts, KeyFacts, cert_problems, key_matches
from ..text import shown
from . import fields
from .fields import Reject

AUTH_KEYS = ("psk", "remote_cert", "remote_name")


@dataclass(frozen=True)
class CertificateFacts:
    """What the certificate inspector found, keyed by file path (values, no file access)."""

    certs: Mapping[str, CertFacts] = field(default_factory=dict)
    keys: Mapping[str, KeyFacts] = field(default_factory=dict)
    chains: Mapping[tuple[str, str], str | None] = field(default_factory=dict)  # (cert, ca) -> problem


@dataclass(frozen=True)
class LocalIdentity:
    name: str
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)


def is_ipsec_interface(options: Mapping[str, str]) -> bool:
    """Upstream's rule: a tunnel wants IPsec when one of the auth keys is present (value ignored)."""
    return any(key in options for key in AUTH_KEYS)


def certificate_paths(desired: DesiredState) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """Which files the inspector must look at for this desired state: (certs, keys, chains).

    Only paths that pass the path rule: a malformed path is refused by validation, never opened.
    """
    certs, keys, chains = global_certificate_paths(desired.global_config)
    certs |= {path for path in map(remote_cert_path, desired.interfaces.values()) if path}
    return certs, keys, chains


def global_certificate_paths(config: GlobalConfig) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """certificate_paths for other_config alone (the host's certificate, key and CA)."""
    certs: set[str] = set()
    keys: set[str] = set()
    chains: set[tuple[str, str]] = set()
    certificate, private_key, ca_cert = (_safe_path(config.certificate), _safe_path(config.private_key),
                                         _safe_path(config.ca_cert))
    if certificate:
        certs.add(certificate)
    if private_key:
        keys.add(private_key)
    if ca_cert:
        certs.add(ca_cert)
        if certificate:
            chains.add((certificate, ca_cert))
    return certs, keys, chains


def remote_cert_path(row: InterfaceRow) -> str | None:
    """The peer certificate file an IPsec row pins, if its path passes the path rule."""
    options = dict(row.options)
    remote_cert = _safe_path(options.get("remote_cert"))
    return remote_cert if remote_cert and is_ipsec_interface(options) else None


def _safe_path(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return fields.path(value, "path")
    except Reject:
        return None


def local_identity(config: GlobalConfig, facts: CertificateFacts,
                   now: float) -> tuple[LocalIdentity | None, str | None]:
    """The host's own certificate identity, or why certificate tunnels cannot use it."""
    if not config.certificate and not config.private_key:
        if config.ca_cert:
            return None, "'ca_cert' is set without 'certificate' and 'private_key'"
        return None, None
    if not config.certificate:
        return None, "'private_key' is set but 'certificate' is not"
    if not config.private_key:
        return None, "'certificate' is set but 'private_key' is not"
    try:
        certificate = fields.path(config.certificate, "other_config:certificate")
        private_key = fields.path(config.private_key, "other_config:private_key")
        ca_cert = fields.path(config.ca_cert, "other_config:ca_cert") if config.ca_cert else None
    except Reject as reject:
        return None, str(reject)
    cert = facts.certs.get(certificate)
    key = facts.keys.get(private_key)
    if cert is None or key is None:
        return None, "local certificate not inspected yet"
    problem = cert.error or cert_problems(cert, now) or key.error
    if problem:
        return None, problem
    if not key_matches(cert, key):
        return None, f"private key {shown(private_key)} does not match certificate {shown(certificate)}"
    if not cert.cn:
        return None, f"certificate {shown(certificate)} has no CN"
    if not fields.NAME_PATTERN.fullmatch(cert.cn):
        return None, f"the CN {shown(cert.cn)} of certificate {shown(certificate)} must be {fields.NAME_RULE}"
    if ca_cert:
        ca = facts.certs.get(ca_cert)
        if ca is None:
            return None, "CA certificate not inspected yet"
        problem = ca.error or cert_problems(ca, now) or facts.chains.get((certificate, ca_cert))
        if problem:
            return None, problem
    return LocalIdentity(cert.cn, cert.pem or b"", key.pem or b""), None
