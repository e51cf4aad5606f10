"""Certificate and key facts for the validator, read from files and cached by file identity.

`CertificateInspector` is the adapter: it reads files and remembers what it parsed, keyed by
(path, device, inode, size, mtime), so an in-place rotation of a file is noticed on the next
call. The module-level functions are pure: they take facts and `now` and touch nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

# cryptography is imported where a certificate or key is parsed, not here: loading it (and
# OpenSSL) costs the monitor about 10 MB of RSS, which a PSK-only host never needs.
if TYPE_CHECKING:
    from cryptography import x509

# A file modified this recently may be modified again within the filesystem's timestamp
# granularity without changing (size, mtime): such facts are not cached (git's "racily
# clean" rule), so a rotation right after a read is still seen.
_RACY_WINDOW_NS = 2_000_000_000
_MAX_CHAIN_RESULTS = 256
_MAX_FILE_BYTES = 1 << 20  # far more than any certificate bundle or key
_VIRTUAL_FILESYSTEMS = ("/proc", "/sys", "/dev")

StatKey = tuple[str, int, int, int, int]
_Facts = TypeVar("_Facts", "CertFacts", "KeyFacts")


@dataclass(frozen=True)
class CertFacts:
    path: str
    pem: bytes | None = field(repr=False)  # the file content as read (None when unreadable)
    digest: str  # sha256 hex of the file content ("" when unreadable)
    error: str | None  # why the certificate is unusable, naming the file
    cn: str | None
    san_dns: tuple[str, ...]
    not_before: float | None  # POSIX seconds
    not_after: float | None
    issuer_cn: str | None
    is_ca: bool
    public_key_der: bytes | None = field(repr=False)  # SubjectPublicKeyInfo DER, to match a private key


@dataclass(frozen=True)
class KeyFacts:
    path: str
    pem: bytes | None = field(repr=False)  # secret: never logged, never in a repr
    digest: str
    error: str | None
    key_type: str | None  # "RSA" | "ECDSA" | "ED25519"
    public_key_der: bytes | None


class CertificateInspector:
    """Reads each version of a certificate or key file once.

    Sharing one between threads is safe in CPython: at worst a file is parsed twice.
    """

    def __init__(self) -> None:
        self._certs: dict[str, tuple[StatKey, CertFacts]] = {}
        self._keys: dict[str, tuple[StatKey, KeyFacts]] = {}
        self._chains: dict[tuple[str, str], str | None] = {}

    def cert(self, path: str) -> CertFacts:
        return self._cached(path, self._certs, cert_facts_from_bytes, _unreadable_cert)

    def key(self, path: str) -> KeyFacts:
        return self._cached(path, self._keys, key_facts_from_bytes, _unreadable_key)

    def verify_chain(self, cert_path: str, ca_path: str) -> str | None:
        """None when the CA in `ca_path` issued `cert_path` (names match, signature verifies)."""
        leaf, authority = self.cert(cert_path), self.cert(ca_path)
        for facts in (leaf, authority):
            if facts.pem is None or facts.public_key_der is None:
                return facts.error
        memo = (leaf.digest, authority.digest)
        if memo not in self._chains:
            if len(self._chains) >= _MAX_CHAIN_RESULTS:
                self._chains.clear()
            self._chains[memo] = chain_problem(leaf, authority)
        return self._chains[memo]

    def retain(self, paths: Collection[str]) -> None:
        """Forget every file not in `paths` (the ones in use): the cache never outgrows them."""
        for cache in (self._certs, self._keys):
            for path in cache.keys() - set(paths):
                del cache[path]

    def _cached(
        self,
        path: str,
        cache: dict[str, tuple[StatKey, _Facts]],
        parse: Callable[[str, bytes], _Facts],
        unreadable: Callable[[str, str], _Facts],
    ) -> _Facts:
        try:
            with _open_pem_file(path) as stream:
                before = os.fstat(stream.fileno())
                current = _stat_key(path, before)
                entry = cache.get(path)
                if entry is not None and entry[0] == current:
                    return entry[1]
                data = stream.read(_MAX_FILE_BYTES + 1)
                after = os.fstat(stream.fileno())
        except _Unusable as refusal:
            cache.pop(path, None)
            return unreadable(path, f"cannot read {path}: {refusal}")
        except OSError as error:
            cache.pop(path, None)
            return unreadable(path, _read_error(path, error))
        facts = parse(path, data)
        read_key, settled_key = _stat_key(path, before), _stat_key(path, after)
        settled = time.time_ns() - after.st_mtime_ns > _RACY_WINDOW_NS
        if read_key == settled_key and settled:
            cache[path] = (read_key, facts)
        else:
            cache.pop(path, None)
        return facts


class _Unusable(Exception):
    """The path names something that is not a certificate or key file; the message says what."""


def _open_pem_file(path: str) -> io.BufferedReader:
    """Open without blocking and check the open file itself (no window between a check and the open).

    The path comes from OVSDB and the daemon runs as root: a FIFO or a device would block the
    worker or never end, and /proc and /sys files (size 0, such as /proc/kmsg) can block in read().
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise _Unusable("not a regular file")
        if status.st_size == 0:
            raise _Unusable("the file is empty")
        if status.st_size > _MAX_FILE_BYTES:
            raise _Unusable("too large for a PEM file")
        real = os.path.realpath(f"/proc/self/fd/{fd}")
        if any(real == root or real.startswith(root + "/") for root in _VIRTUAL_FILESYSTEMS):
            raise _Unusable("a kernel interface file, not a certificate or key")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def cert_facts_from_bytes(path: str, data: bytes) -> CertFacts:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    digest = hashlib.sha256(data).hexdigest()
    try:
        bundle = x509.load_pem_x509_certificates(data)
        cert = bundle[0]
    except ValueError:
        unparsable = (f"{path} holds a PEM certificate that cannot be parsed"
                      if b"-----BEGIN CERTIFICATE-----" in data else f"{path} is not a PEM certificate")
        return CertFacts(path, data, digest, unparsable, None, (), None, None, None, False, None)
    damaged: str | None = None
    try:
        extensions = cert.extensions
    except ValueError as error:
        extensions = x509.Extensions([])
        damaged = f"{path}: the certificate's extensions cannot be parsed ({error})"
    cn, san_dns, is_ca = _common_name(cert.subject), _san_dns(extensions), _is_ca(extensions)
    reason = damaged or _rule_violation(path, cert.version, cn, san_dns, is_ca)
    return CertFacts(
        path=path,
        # The certificates alone, as we serialise them: whatever else the file holds (comments,
        # a key pasted in by mistake) never reaches an IKE daemon.
        pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle),
        digest=digest,
        error=reason,
        cn=cn,
        san_dns=san_dns,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        issuer_cn=_common_name(cert.issuer),
        is_ca=is_ca,
        public_key_der=_spki(cert.public_key()),
    )


def _rule_violation(
    path: str, version: x509.Version, cn: str | None, san_dns: tuple[str, ...], is_ca: bool
) -> str | None:
    """The OVS IPsec rules for a certificate (a CA certificate needs no SAN)."""
    from cryptography import x509

    if version != x509.Version.v3:
        return f"{path} is not an x.509 v3 certificate"
    if is_ca:
        return None
    if cn is None:
        return f"{path} has no common name (CN) in its subject"
    if cn not in san_dns:
        # IKE identities are @CN (FQDN type), which peers match against SAN DNS entries.
        return f"{path}: subjectAltName DNS {list(san_dns)} does not include the CN '{cn}'"
    return None


def key_facts_from_bytes(path: str, data: bytes) -> KeyFacts:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    digest = hashlib.sha256(data).hexdigest()
    encrypted = f"{path} is encrypted (an IKE daemon cannot load it unattended)"
    if b"ENCRYPTED" in data:
        return KeyFacts(path, data, digest, encrypted, None, None)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "a password is needed"
        return KeyFacts(path, data, digest, encrypted, None, None)
    except (ValueError, UnsupportedAlgorithm):
        # Our own words only: a parser message could quote part of the secret.
        return KeyFacts(path, data, digest, f"{path} is not a PEM private key", None, None)
    key_type = _key_type(key)
    if key_type is None:
        reason = f"{path} holds a key type IKE daemons do not sign with (use ECDSA or RSA)"
        return KeyFacts(path, data, digest, reason, None, None)
    # The key alone, re-serialised: nothing else from the file reaches an IKE daemon.
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return KeyFacts(path, pem, digest, None, key_type, _spki(key.public_key()))


def chain_problem(leaf: CertFacts, authority: CertFacts) -> str | None:
    """Pure: does any certificate in the CA file issue `leaf`? Uses the PEM held in the facts."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

    if leaf.pem is None or authority.pem is None:
        return leaf.error or authority.error
    try:
        cert = x509.load_pem_x509_certificates(leaf.pem)[0]
        candidates = x509.load_pem_x509_certificates(authority.pem)
    except ValueError:
        return leaf.error or authority.error or f"{leaf.path} or {authority.path} cannot be parsed"
    prefix = f"{leaf.path} is not signed by the CA in {authority.path}"
    same_name = [candidate for candidate in candidates if candidate.subject == cert.issuer]
    if not same_name:
        issuer = leaf.issuer_cn or cert.issuer.rfc4514_string()
        ca_name = _common_name(candidates[0].subject) or candidates[0].subject.rfc4514_string()
        return f"{prefix}: it was issued by '{issuer}', the CA is '{ca_name}'"
    for candidate in same_name:
        try:
            cert.verify_directly_issued_by(candidate)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if candidate == cert or _is_ca(_extensions_or_none(candidate)):
            return None
        return f"{prefix}: {authority.path} is not a CA certificate (basicConstraints CA:TRUE is missing)"
    return f"{prefix}: the issuer name matches but the signature does not verify with the CA's key"


def cert_problems(facts: CertFacts, now: float) -> str | None:
    """The reason the certificate cannot be used at `now`, or None."""
    if facts.error is not None:
        return facts.error
    if facts.not_before is None or facts.not_after is None:
        return f"{facts.path} has no validity period"
    if now < facts.not_before:
        return f"{facts.path} is not valid yet: its validity starts {_utc(facts.not_before)}"
    if now > facts.not_after:
        return f"{facts.path} expired on {_utc(facts.not_after)}"
    return None


def key_matches(cert: CertFacts, key: KeyFacts) -> bool:
    return cert.public_key_der is not None and cert.public_key_der == key.public_key_der


def expires_soon(facts: CertFacts, now: float, days: int = 30) -> bool:
    """True when the certificate ends within `days` of `now` (or has already ended)."""
    return facts.not_after is not None and facts.not_after - now <= days * 86400


def _stat_key(path: str, status: os.stat_result) -> StatKey:
    return (path, status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def _read_error(path: str, error: OSError) -> str:
    return f"cannot read {path}: {error.strerror or error}"


def _unreadable_cert(path: str, reason: str) -> CertFacts:
    return CertFacts(path, None, "", reason, None, (), None, None, None, False, None)


def _unreadable_key(path: str, reason: str) -> KeyFacts:
    return KeyFacts(path, None, "", reason, None, None)


def _common_name(name: x509.Name) -> str | None:
    from cryptography.x509.oid import NameOID

    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return None
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _san_dns(extensions: x509.Extensions) -> tuple[str, ...]:
    from cryptography import x509

    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.get_values_for_type(x509.DNSName))


def _extensions_or_none(cert: x509.Certificate) -> x509.Extensions:
    from cryptography import x509

    try:
        return cert.extensions
    except ValueError:
        return x509.Extensions([])


def _is_ca(extensions: x509.Extensions) -> bool:
    from cryptography import x509

    try:
        return extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _key_type(key: object) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ED25519"
    return None


def _spki(public_key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _utc(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))
