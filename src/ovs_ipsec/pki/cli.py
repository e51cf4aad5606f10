"""`ovs-ipsec pki`: an ovs-pki work-alike for IPsec certificates.

Same commands, file names and folder layout as Open vSwitch's ovs-pki, so the OVS IPsec
tutorial works word for word (`ovs-ipsec pki req -u host_1`, `... sign host_1 switch`), but
the certificates are always v3 with subjectAltName DNS = CN and keys are ECDSA P-256 unless
asked otherwise. Options may come before or after the command, as with ovs-pki.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ovs_ipsec.atomicfile import write_atomic
from ovs_ipsec.errors import OvsIpsecError
from ovs_ipsec.pki import files
from ovs_ipsec.pki.files import CA_KINDS, DEFAULT_DAYS, DEFAULT_PKI_DIR, NameFiles, PkiError, PkiLayout
from ovs_ipsec.pki.inspect import (
    CertificateInspector,
    cert_facts_from_bytes,
    cert_problems,
    expires_soon,
    key_facts_from_bytes,
    key_matches,
)

# cryptography (in `ca` too) is imported by the commands that use it: `ovs-ipsec` registers this
# command line for every subcommand, `monitor` included, and loading it costs about 10 MB of RSS.
if TYPE_CHECKING:
    from cryptography import x509

PROG = "ovs-ipsec pki"
Handler = Callable[[argparse.Namespace], int]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `pki` on the `ovs-ipsec` command line; `args.func(args)` returns the exit code."""
    summary = "create and check IPsec keys and certificates"
    parser = subparsers.add_parser("pki", help=summary, description=__doc__)
    configure_parser(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    configure_parser(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed
        return exit_request.code if isinstance(exit_request.code, int) else 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    try:
        return args.pki_handler(args)
    except OvsIpsecError as error:  # PkiError, and a file that could not be written
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1


def configure_parser(parser: argparse.ArgumentParser) -> None:
    _add_shared_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        # Accept the options after the command too ("req -u host_1" in the OVS tutorial).
        _add_shared_options(sub, suppress=True)
        sub.set_defaults(pki_handler=handler)
        return sub

    command("init", "create the switch and controller CAs under --dir", _cmd_init)
    for name, text, handler in (
        ("req", "write NAME-privkey.pem (mode 0600) and NAME-req.pem", _cmd_req),
        ("self-sign", "sign NAME-req.pem with NAME-privkey.pem into NAME-cert.pem", _cmd_self_sign),
    ):
        command(name, text, handler).add_argument("name")
    for name, text, handler in (
        ("sign", "sign NAME-req.pem with a CA into NAME-cert.pem", _cmd_sign),
        ("req+sign", "req, then sign", _cmd_req_sign),
    ):
        sub = command(name, text, handler)
        sub.add_argument("name")
        sub.add_argument("type", nargs="?", default="switch", choices=CA_KINDS, help="default: switch")
    show = command("show", "describe a certificate, request or private key (never the key itself)", _cmd_show)
    show.add_argument("file")
    verify = command("verify", "check a certificate for IPsec use (exit 1 and say why if not)", _cmd_verify)
    verify.add_argument("cert", help="a certificate file (or, as with ovs-pki, NAME for NAME-cert.pem)")
    verify.add_argument("type", nargs="?", choices=CA_KINDS, help="with NAME: the CA under --dir to use")
    verify.add_argument("--ca", help="CA certificate that must have issued CERT")
    verify.add_argument("--name", help="the CN that CERT must have (what a peer sets as remote_name)")
    verify.add_argument("--key", help="private key that must belong to CERT")


def _add_shared_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # On the command's own parser the defaults are SUPPRESS, so an option given before the
    # command is not reset by the command's parser.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    add = parser.add_argument
    add("-d", "--dir", default=default(str(DEFAULT_PKI_DIR)), help=f"PKI folder (default: {DEFAULT_PKI_DIR})")
    add("-f", "--force", action="store_true", default=default(False), help="overwrite existing files")
    add("-k", "--key-type", choices=("ecdsa", "rsa"), default=default("ecdsa"), help="default: ecdsa")
    add("-B", "--bits", type=_positive_int, default=default(None),
        help="key size: ecdsa 256 (default) or 384; rsa 2048 (default), 3072 or 4096")
    add("--days", type=_positive_int, default=default(DEFAULT_DAYS),
        help=f"validity in days (default: {DEFAULT_DAYS}, as ovs-pki)")
    add("-u", "--unique", action="store_true", default=default(False),
        help="accepted for ovs-pki compatibility: the CN is always exactly NAME")
    add("-b", "--batch", action="store_true", default=default(False),
        help="accepted for ovs-pki compatibility: nothing ever prompts")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return value


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _utc(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _cmd_init(args: argparse.Namespace) -> int:
    from ovs_ipsec.pki import ca

    layout, spec = PkiLayout(Path(args.dir)), ca.KeySpec.parse(args.key_type, args.bits)
    existing = tuple(path for kind in CA_KINDS for path in (layout.ca_cert(kind), layout.ca_key(kind)))
    files.refuse_existing(existing, args.force)
    files.make_dir(layout.root, files.PUBLIC_DIR_MODE)
    for kind in CA_KINDS:
        authority = ca.make_authority(kind, spec, args.days, _now())
        ca.save_authority(layout, kind, authority, args.force)
        until = _utc(authority.cert.not_valid_after_utc)
        print(f"created the {kind} CA ({spec.describe()}, valid until {until}):")
        print(f"  certificate {layout.ca_cert(kind)}")
        print(f"  private key {layout.ca_key(kind)} (mode 0600)")
    return 0


def _cmd_req(args: argparse.Namespace) -> int:
    from ovs_ipsec.pki import ca

    named, spec = NameFiles(ca.check_name(args.name)), ca.KeySpec.parse(args.key_type, args.bits)
    files.refuse_existing((named.private_key, named.request), args.force)
    key = ca.generate_key(spec)
    request = ca.make_request(key, named.name)
    write_atomic(named.private_key, ca.private_key_pem(key), secret=True, overwrite=args.force)
    write_atomic(named.request, ca.pem(request), secret=False, overwrite=args.force)
    print(f"wrote {named.private_key} ({spec.describe()}, mode 0600) and {named.request}")
    print(f"{named.request}\tfingerprint {ca.fingerprint(request)}")
    return 0


def _cmd_self_sign(args: argparse.Namespace) -> int:
    from ovs_ipsec.pki import ca

    named = NameFiles(args.name)
    key, request = ca.load_private_key(named.private_key), ca.load_request(named.request)
    if ca.public_key_der(key.public_key()) != ca.public_key_der(request.public_key()):
        raise PkiError(f"{named.private_key} is not the private key of {named.request}")
    files.refuse_existing((named.certificate,), args.force)
    cert = _about(named.request, lambda: ca.self_sign(request, key, args.days, _now()))
    write_atomic(named.certificate, ca.pem(cert), secret=False, overwrite=args.force)
    print(f"wrote {named.certificate} (self-signed, valid until {_utc(cert.not_valid_after_utc)})")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from ovs_ipsec.pki import ca

    named, layout = NameFiles(args.name), PkiLayout(Path(args.dir))
    if not layout.ca_cert(args.type).exists():
        where = layout.ca_dir(args.type)
        raise PkiError(f"no {args.type} CA in {where}: run '{PROG} --dir {layout.root} init' first")
    authority = ca.load_authority(layout, args.type, _now())
    request = ca.load_request(named.request)
    files.refuse_existing((named.certificate,), args.force)
    cert = _about(named.request, lambda: ca.issue(request, authority, args.days, _now()))
    write_atomic(named.certificate, ca.pem(cert), secret=False, overwrite=args.force)
    ca.record_issued(layout, args.type, cert)
    print(f"{named.request}\tfingerprint {ca.fingerprint(request)}")
    until = _utc(cert.not_valid_after_utc)
    print(f"wrote {named.certificate} (signed by the {args.type} CA, valid until {until})")
    print(f"the CA certificate to give the peers: {layout.ca_cert(args.type)}")
    return 0


def _cmd_req_sign(args: argparse.Namespace) -> int:
    _cmd_req(args)
    return _cmd_sign(args)


def _cmd_show(args: argparse.Namespace) -> int:
    from ovs_ipsec.pki import ca

    path = Path(args.file)
    data = files.read_bytes(path)
    if b"-----BEGIN CERTIFICATE-----" in data:
        _show_certificate(str(path), data)
    elif b"CERTIFICATE REQUEST-----" in data:
        _show_request(ca.load_request(path))
    elif b"PRIVATE KEY-----" in data:
        facts = key_facts_from_bytes(str(path), data)
        if facts.error:
            raise PkiError(facts.error)
        print(f"Private key: {facts.key_type} (contents not shown)")
        print(f"Public key SHA-256: {_sha256(facts.public_key_der or b'')}")
    else:
        raise PkiError(f"{path} is not a PEM certificate, certificate request or private key")
    return 0


def _show_certificate(path: str, data: bytes) -> None:
    from cryptography import x509

    from ovs_ipsec.pki import ca

    facts = cert_facts_from_bytes(path, data)
    if facts.public_key_der is None:
        raise PkiError(facts.error or f"{path} cannot be parsed")
    cert = x509.load_pem_x509_certificates(data)[0]
    print(f"Subject:     {cert.subject.rfc4514_string()}")
    print(f"Issuer:      {cert.issuer.rfc4514_string()}")
    print(f"Version:     {cert.version.value + 1}")
    print(f"Serial:      {cert.serial_number:X}")
    print(f"Valid from:  {_utc(cert.not_valid_before_utc)}")
    print(f"Valid until: {_utc(cert.not_valid_after_utc)}")
    print(f"Public key:  {_describe_public(cert.public_key())}")
    print(f"SAN DNS:     {', '.join(facts.san_dns) or '(none)'}")
    print(f"CA:          {'yes' if facts.is_ca else 'no'}")
    print(f"SHA-256:     {ca.fingerprint(cert)}")
    print(f"Status:      {cert_problems(facts, time.time()) or 'OK'}")


def _show_request(request: x509.CertificateSigningRequest) -> None:
    from cryptography import x509

    from ovs_ipsec.pki import ca

    try:
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = ", ".join(san.get_values_for_type(x509.DNSName)) or "(none)"
    except x509.ExtensionNotFound:
        names = "(none)"
    print(f"Request for: {request.subject.rfc4514_string()}")
    print(f"SAN DNS:     {names}")
    print(f"Public key:  {_describe_public(request.public_key())}")
    print(f"SHA-256:     {ca.fingerprint(request)}")


def _cmd_verify(args: argparse.Namespace) -> int:
    cert_path, ca_path = args.cert, args.ca
    named = NameFiles(args.cert).certificate
    if not Path(cert_path).exists() and named.exists():
        # ovs-pki's form: "verify NAME [TYPE]" checks NAME-cert.pem against the PKI's CA.
        cert_path = str(named)
        ca_path = ca_path or str(PkiLayout(Path(args.dir)).ca_cert(args.type or "switch"))
    inspector, now = CertificateInspector(), time.time()
    facts = inspector.cert(cert_path)
    problems = [cert_problems(facts, now)]
    if ca_path and facts.public_key_der is not None:
        problems.append(inspector.verify_chain(cert_path, ca_path))
    if args.name is not None and facts.cn is not None and facts.cn != args.name:
        problems.append(f"{cert_path}: the CN is '{facts.cn}', not '{args.name}'")
    if args.key is not None:
        key = inspector.key(args.key)
        if key.error is not None:
            problems.append(key.error)
        elif facts.public_key_der is not None and not key_matches(facts, key):
            problems.append(f"{args.key} is not the private key of {cert_path}")
    found = [problem for problem in problems if problem]
    if found:
        for problem in found:
            print(f"FAILED: {problem}")
        return 1
    if expires_soon(facts, now):
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(facts.not_after))
        print(f"warning: {cert_path} expires soon ({until})")
    print(f"{cert_path}: OK")
    return 0


def _about(request_path: Path, make: Callable[[], x509.Certificate]) -> x509.Certificate:
    """Name the request file in errors about its contents."""
    try:
        return make()
    except PkiError as error:
        raise PkiError(f"{request_path}: {error}") from None


def _describe_public(public_key: object) -> str:
    size = getattr(public_key, "key_size", None)
    curve = getattr(public_key, "curve", None)
    if curve is not None:
        return f"ECDSA {curve.name}"
    if size is not None:
        return f"RSA {size}"
    return type(public_key).__name__.removesuffix("PublicKey")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
