"""Keys, certificate requests and certificates for IPsec, made like ovs-pki makes them.

Built on the `cryptography` package only (no openssl subprocess). The certificates follow
what the OVS IPsec documentation requires: x.509 v3 with a subjectAltName DNS entry equal to
the common name, because both IKE daemons use `@CN` (an FQDN identity) as the peer's ID.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ovs_ipsec.atomicfile import write_atomic
from ovs_ipsec.pki import files
from ovs_ipsec.pki.files import PkiError, PkiLayout

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

ORGANIZATION = "Open vSwitch"
LEAF_UNIT = "Open vSwitch certifier"
# Hosts rarely agree on the time to the second; a certificate made on the CA machine must
# already be valid on a peer whose clock is a little behind.
CLOCK_SKEW = dt.timedelta(hours=1)
MIN_RSA_BITS = 2048

_RSA_SIZES = (2048, 3072, 4096)
_EC_CURVES = MappingProxyType({256: ec.SECP256R1, 384: ec.SECP384R1})
# A CN becomes a DNS subjectAltName and an IKE identity: keep it to characters every IKE
# daemon and the upstream monitor's `CN=(.+?),` parsing handle.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class KeySpec:
    """The kind of key to generate: ECDSA (256 or 384 bits) or RSA (2048, 3072 or 4096)."""

    kind: str
    bits: int

    @classmethod
    def parse(cls, kind: str, bits: int | None) -> KeySpec:
        kind = kind.lower()
        if kind == "ecdsa":
            chosen = 256 if bits is None else bits
            if chosen not in _EC_CURVES:
                raise PkiError(f"ECDSA keys have 256 or 384 bits, not {chosen}")
            return cls("ecdsa", chosen)
        if kind == "rsa":
            chosen = 2048 if bits is None else bits
            if chosen not in _RSA_SIZES:
                sizes = ", ".join(str(size) for size in _RSA_SIZES)
                raise PkiError(f"RSA keys have {sizes} bits, not {chosen}")
            return cls("rsa", chosen)
        raise PkiError(f"unknown key type '{kind}' (expected ecdsa or rsa)")

    def describe(self) -> str:
        return f"ECDSA P-{self.bits}" if self.kind == "ecdsa" else f"RSA {self.bits}"


DEFAULT_KEY = KeySpec("ecdsa", 256)


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: PrivateKey = field(repr=False)


def check_name(name: str) -> str:
    if not _NAME_PATTERN.fullmatch(name):
        raise PkiError(
            f"invalid name '{name}': use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it becomes the certificate's CN and DNS name)"
        )
    return name


def generate_key(spec: KeySpec) -> PrivateKey:
    if spec.kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=spec.bits)
    return ec.generate_private_key(_EC_CURVES[spec.bits]())


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8, like ovs-pki: the IKE daemon has to load it unattended."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem(item: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return item.public_bytes(serialization.Encoding.PEM)


def fingerprint(item: x509.Certificate | x509.CertificateSigningRequest) -> str:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(item.public_bytes(serialization.Encoding.DER))
    return digest.finalize().hex()


def make_request(key: PrivateKey, name: str) -> x509.CertificateSigningRequest:
    # Something must follow the CN in the RFC 2253 form of the subject: the upstream
    # ovs-monitor-ipsec extracts it with the regex `CN=(.+?),`, so a bare "CN=x" has no name.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, LEAF_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, check_name(name)),
        ]
    )
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(key, _signature_hash(key))


def self_sign(
    request: x509.CertificateSigningRequest, key: PrivateKey, days: int, now: dt.datetime
) -> x509.Certificate:
    """A self-signed host certificate for `options:remote_cert` mode."""
    if public_key_der(request.public_key()) != public_key_der(key.public_key()):
        raise PkiError("the private key does not belong to the certificate request")
    common_name = _request_cn(request)
    builder = _leaf_builder(request, common_name, request.subject, now, now + dt.timedelta(days=days))
    return builder.sign(key, _signature_hash(key))


def issue(
    request: x509.CertificateSigningRequest, authority: CertificateAuthority, days: int, now: dt.datetime
) -> x509.Certificate:
    """A host certificate signed by the CA, for `other_config:ca_cert` + `remote_name` mode."""
    common_name = _request_cn(request)
    ca_end = authority.cert.not_valid_after_utc
    if ca_end <= now:
        raise PkiError(f"the CA certificate expired on {ca_end:%Y-%m-%d %H:%M:%S} UTC")
    # A certificate cannot be trusted longer than the CA that vouches for it.
    not_after = min(now + dt.timedelta(days=days), ca_end)
    builder = _leaf_builder(request, common_name, authority.cert.subject, now, not_after)
    builder = builder.add_extension(_authority_key_id(authority.cert), critical=False)
    return builder.sign(authority.key, _signature_hash(authority.key))


def make_authority(kind: str, spec: KeySpec, days: int, now: dt.datetime) -> CertificateAuthority:
    key = generate_key(spec)
    unit = f"{kind}ca"
    # The creation time in the CN (as ovs-pki does) keeps two CAs made on different days
    # from having the same name, which would confuse chain building.
    label = f"OVS {unit} CA Certificate ({now:%Y %b %d %H:%M:%S})"
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, label),
        ]
    )
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return CertificateAuthority(builder.sign(key, _signature_hash(key)), key)


def load_request(path: Path) -> x509.CertificateSigningRequest:
    data = files.read_bytes(path)
    try:
        request = x509.load_pem_x509_csr(data)
    except ValueError:
        raise PkiError(f"{path} is not a PEM certificate request") from None
    try:
        intact = request.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        intact = False
    if not intact:
        raise PkiError(f"{path}: the request's self-signature does not verify (corrupted or altered)")
    return request


def load_private_key(path: Path) -> PrivateKey:
    data = files.read_bytes(path)
    if b"ENCRYPTED" in data:
        raise PkiError(f"{path} is encrypted; this tool only uses unencrypted keys")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never chain or echo the parser's message: it could quote part of the key.
        raise PkiError(f"{path} is not a PEM private key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise PkiError(f"{path} holds a key type IKE daemons do not sign with (use ECDSA or RSA)")
    return key


def load_authority(layout: PkiLayout, kind: str, now: dt.datetime) -> CertificateAuthority:
    """The CA of `kind`, ready to sign at `now`."""
    cert_path, key_path = layout.ca_cert(kind), layout.ca_key(kind)
    data = files.read_bytes(cert_path)
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{cert_path} is not a PEM certificate") from None
    if cert.not_valid_after_utc <= now:
        raise PkiError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    key = load_private_key(key_path)
    if public_key_der(cert.public_key()) != public_key_der(key.public_key()):
        raise PkiError(f"{key_path} is not the private key of {cert_path}")
    return CertificateAuthority(cert, key)


def save_authority(layout: PkiLayout, kind: str, authority: CertificateAuthority, force: bool) -> None:
    files.make_dir(layout.ca_dir(kind), files.PUBLIC_DIR_MODE)
    files.make_dir(layout.ca_private_dir(kind), files.PRIVATE_DIR_MODE)
    files.make_dir(layout.newcerts(kind), files.PUBLIC_DIR_MODE)
    # Key first: a cacert.pem without its key would look like a usable CA.
    write_atomic(layout.ca_key(kind), private_key_pem(authority.key), secret=True, overwrite=force)
    write_atomic(layout.ca_cert(kind), pem(authority.cert), secret=False, overwrite=force)
    write_atomic(layout.index(kind), b"", secret=False, overwrite=force)


def record_issued(layout: PkiLayout, kind: str, cert: x509.Certificate) -> Path:
    """Keep the CA's audit trail the way `openssl ca` does (newcerts/SERIAL.pem, index.txt)."""
    serial = _openssl_serial(cert.serial_number)
    copy = layout.newcerts(kind) / f"{serial}.pem"
    files.make_dir(layout.newcerts(kind), files.PUBLIC_DIR_MODE)
    write_atomic(copy, pem(cert), secret=False, overwrite=True)
    subject = "".join(f"/{attribute.rfc4514_attribute_name}={_text(attribute.value)}" for attribute in cert.subject)
    expiry = _openssl_time(cert.not_valid_after_utc)
    files.append_line(layout.index(kind), f"V\t{expiry}\t\t{serial}\tunknown\t{subject}\n")
    return copy


def _leaf_builder(
    request: x509.CertificateSigningRequest,
    common_name: str,
    issuer: x509.Name,
    now: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    public_key = request.public_key()
    _check_leaf_key(public_key)
    return (
        x509.CertificateBuilder()
        .subject_name(request.subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        # Only the CN, whatever else the request asked for: the CN is the IKE identity.
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public_key = ca_cert.public_key()
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _request_cn(request: x509.CertificateSigningRequest) -> str:
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or not isinstance(names[0].value, str) or not names[0].value:
        raise PkiError("the certificate request has no common name (CN)")
    value = names[0].value
    if not value.isascii() or not value.isprintable():
        raise PkiError(f"the request's CN {value!r} cannot be a DNS subjectAltName (ASCII only)")
    return value


def _check_leaf_key(public_key: object) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            bits = public_key.key_size
            raise PkiError(f"the request's RSA key has {bits} bits; at least {MIN_RSA_BITS} are needed")
        return
    if isinstance(public_key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        return
    raise PkiError("the request's key type cannot authenticate IKE (use ECDSA or RSA)")


def _key_usage(*, key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 hashes internally
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def public_key_der(public_key: object) -> bytes:
    """SubjectPublicKeyInfo DER: equal for a private key and the certificate it belongs to."""
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _openssl_serial(serial: int) -> str:
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else f"0{text}"


def _openssl_time(moment: dt.datetime) -> str:
    # index.txt uses ASN.1 UTCTime until 2049 and GeneralizedTime from 2050 on.
    return moment.strftime("%y%m%d%H%M%SZ" if moment.year < 2050 else "%Y%m%d%H%M%SZ")


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
