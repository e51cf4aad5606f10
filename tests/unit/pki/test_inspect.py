"""The certificate facts the validator relies on, from real files built with `cryptography`."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ovs_ipsec.pki.inspect import (
    CertFacts,
    CertificateInspector,
    KeyFacts,
    cert_problems,
    expires_soon,
    key_matches,
)

NOW = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC)
DAY = 86400.0


def name(cn: str) -> x509.Name:
    organization = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Open vSwitch")
    return x509.Name([organization, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def build(
    cn: str,
    *,
    key=None,
    issuer: tuple[x509.Certificate, object] | None = None,
    san: list[str] | None = None,
    is_ca: bool = False,
    start: dt.datetime = NOW - dt.timedelta(days=1),
    end: dt.datetime = NOW + dt.timedelta(days=365),
    serial: int | None = None,
) -> tuple[x509.Certificate, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (name(cn), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    dns = [cn] if san is None and not is_ca else (san or [])
    if dns:
        san = x509.SubjectAlternativeName([x509.DNSName(d) for d in dns])
        builder = builder.add_extension(san, critical=False)
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm), key


def write_cert(path: Path, *certs: x509.Certificate) -> str:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return str(path)


def write_key(path: Path, key, password: bytes | None = None) -> str:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path.write_bytes(pem)
    return str(path)


@pytest.fixture
def inspector() -> CertificateInspector:
    return CertificateInspector()


def test_good_host_certificate_facts(tmp_path, inspector):
    cert, key = build("host_1")
    facts = inspector.cert(write_cert(tmp_path / "host_1-cert.pem", cert))
    assert facts.error is None
    assert (facts.cn, facts.san_dns, facts.issuer_cn, facts.is_ca) == ("host_1", ("host_1",), "host_1", False)
    assert facts.not_before == (NOW - dt.timedelta(days=1)).timestamp()
    assert facts.not_after == (NOW + dt.timedelta(days=365)).timestamp()
    assert len(facts.digest) == 64 and facts.pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert cert_problems(facts, NOW.timestamp()) is None


def test_missing_file(tmp_path, inspector):
    path = str(tmp_path / "absent.pem")
    facts = inspector.cert(path)
    assert facts.error == f"cannot read {path}: No such file or directory"
    assert (facts.pem, facts.digest, facts.public_key_der) == (None, "", None)
    assert cert_problems(facts, NOW.timestamp()) == facts.error
    assert inspector.key(path).error == f"cannot read {path}: No such file or directory"


def test_special_files_are_refused_without_blocking(tmp_path, inspector):
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    assert inspector.cert(str(fifo)).error == f"cannot read {fifo}: not a regular file"
    assert inspector.key("/dev/zero").error == "cannot read /dev/zero: not a regular file"


@pytest.mark.parametrize("path", ["/proc/kmsg", "/proc/self/status", "/sys/kernel/uevent_seqnum"])
def test_kernel_interface_files_are_refused_without_reading(path, inspector):
    # /proc/kmsg is a regular file of size 0 whose read() blocks until the kernel logs something.
    done = threading.Event()
    result = []
    threading.Thread(target=lambda: (result.append(inspector.cert(path)), done.set()), daemon=True).start()
    assert done.wait(5), f"reading {path} blocked"
    assert result[0].error.startswith(f"cannot read {path}: ")


def test_an_empty_file_is_refused(tmp_path, inspector):
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    assert inspector.cert(str(empty)).error == f"cannot read {empty}: the file is empty"


def test_the_cache_holds_only_the_files_in_use(tmp_path, inspector):
    write_cert(tmp_path / "host.pem", build("host")[0])
    os.utime(tmp_path / "host.pem", (0, 0))  # settled: cacheable
    spellings = [f"{tmp_path}{'/.' * i}/host.pem" for i in range(50)]
    for spelling in spellings:
        inspector.cert(spelling)
    assert len(inspector._certs) == 50
    inspector.retain(spellings[:1])
    assert set(inspector._certs) == {spellings[0]}


def test_only_the_certificate_reaches_the_facts_not_the_rest_of_the_file(tmp_path, inspector):
    cert, key = build("host")
    write_key(tmp_path / "key.pem", key)
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"comment line\n" + cert.public_bytes(serialization.Encoding.PEM)
                     + (tmp_path / "key.pem").read_bytes())
    facts = inspector.cert(str(path))
    assert facts.error is None and b"PRIVATE KEY" not in facts.pem and b"comment" not in facts.pem


def test_garbage_file(tmp_path, inspector):
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"this is not a certificate\n")
    facts = inspector.cert(str(path))
    assert facts.error == f"{path} is not a PEM certificate"
    assert facts.digest and facts.cn is None
    assert inspector.key(str(path)).error == f"{path} is not a PEM private key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_v1_certificate_is_rejected(tmp_path, inspector):
    key = tmp_path / "v1-key.pem"
    write_key(key, ec.generate_private_key(ec.SECP256R1()))
    request, cert = tmp_path / "v1-req.pem", tmp_path / "v1-cert.pem"
    def run(*argv: object) -> None:
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)

    run("req", "-new", "-key", key, "-subj", "/O=x/CN=v1", "-out", request)
    # `x509 -req` without an extension file makes a version 1 certificate.
    run("x509", "-req", "-in", request, "-signkey", key, "-days", "2", "-out", cert)
    assert x509.load_pem_x509_certificate(cert.read_bytes()).version == x509.Version.v1
    facts = inspector.cert(str(cert))
    assert facts.error == f"{cert} is not an x.509 v3 certificate"
    assert facts.cn == "v1"


def test_san_must_include_cn(tmp_path, inspector):
    cert, _ = build("b", san=["a"])
    path = write_cert(tmp_path / "x.pem", cert)
    assert inspector.cert(path).error == f"{path}: subjectAltName DNS ['a'] does not include the CN 'b'"
    no_san, _ = build("b", san=[])
    path = write_cert(tmp_path / "y.pem", no_san)
    assert inspector.cert(path).error == f"{path}: subjectAltName DNS [] does not include the CN 'b'"


def test_ca_certificate_needs_no_san(tmp_path, inspector):
    cert, _ = build("My CA", is_ca=True)
    facts = inspector.cert(write_cert(tmp_path / "ca.pem", cert))
    assert facts.error is None and facts.is_ca and facts.san_dns == ()


def test_expired_and_not_yet_valid(tmp_path, inspector):
    old, _ = build("old", start=NOW - dt.timedelta(days=30), end=NOW - dt.timedelta(days=2))
    path = write_cert(tmp_path / "old.pem", old)
    facts = inspector.cert(path)
    assert facts.error is None  # dates are judged against `now`, by the pure helper
    assert cert_problems(facts, NOW.timestamp()) == f"{path} expired on 2026-01-13 12:00:00 UTC"
    future, _ = build("future", start=NOW + dt.timedelta(days=3))
    path = write_cert(tmp_path / "future.pem", future)
    assert cert_problems(inspector.cert(path), NOW.timestamp()) == (
        f"{path} is not valid yet: its validity starts 2026-01-18 12:00:00 UTC"
    )


def test_expires_soon():
    facts = CertFacts("c.pem", b"", "d", None, "c", ("c",), 0.0, 100 * DAY, "c", False, b"k")
    assert not expires_soon(facts, 60 * DAY)
    assert expires_soon(facts, 75 * DAY)
    assert expires_soon(facts, 95 * DAY, days=10)
    assert not expires_soon(facts, 85 * DAY, days=10)
    assert expires_soon(facts, 101 * DAY)  # already over counts too


@pytest.mark.parametrize(
    "make_key, key_type",
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "ECDSA"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        (ed25519.Ed25519PrivateKey.generate, "ED25519"),
    ],
)
def test_key_types_and_matching(tmp_path, inspector, make_key, key_type):
    key = make_key()
    cert, _ = build("h", key=key)
    cert_facts = inspector.cert(write_cert(tmp_path / "h-cert.pem", cert))
    key_facts = inspector.key(write_key(tmp_path / "h-privkey.pem", key))
    assert key_facts.error is None and key_facts.key_type == key_type
    assert key_matches(cert_facts, key_facts)
    other = inspector.key(write_key(tmp_path / "other.pem", ec.generate_private_key(ec.SECP256R1())))
    assert not key_matches(cert_facts, other)


def test_key_mismatch_and_unusable_keys(tmp_path, inspector):
    cert, _ = build("h")
    facts = inspector.cert(write_cert(tmp_path / "h.pem", cert))
    assert not key_matches(facts, inspector.key(str(tmp_path / "none.pem")))
    encrypted = write_key(tmp_path / "enc.pem", ec.generate_private_key(ec.SECP256R1()), password=b"secret")
    key = inspector.key(encrypted)
    assert key.error == f"{encrypted} is encrypted (an IKE daemon cannot load it unattended)"
    assert key.public_key_der is None and not key_matches(facts, key)
    cert_as_key = inspector.key(str(tmp_path / "h.pem"))
    assert cert_as_key.error == f"{tmp_path / 'h.pem'} is not a PEM private key"


def test_key_pem_never_in_repr(tmp_path, inspector):
    path = write_key(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
    facts = inspector.key(path)
    body = Path(path).read_text().splitlines()[1]
    assert body not in repr(facts) and "BEGIN" not in repr(facts) and "pem=" not in repr(facts)
    assert isinstance(facts, KeyFacts) and facts.pem == Path(path).read_bytes()


def test_chain_ok_and_wrong_ca(tmp_path, inspector):
    ca_cert, ca_key = build("CA one", is_ca=True)
    other_cert, _ = build("CA two", is_ca=True)
    impostor_cert, _ = build("CA one", is_ca=True)  # same name, different key
    host, _ = build("host", issuer=(ca_cert, ca_key))
    host_path = write_cert(tmp_path / "host.pem", host)
    ca_path = write_cert(tmp_path / "ca.pem", ca_cert)
    assert inspector.verify_chain(host_path, ca_path) is None
    other = write_cert(tmp_path / "other.pem", other_cert)
    assert inspector.verify_chain(host_path, other) == (
        f"{host_path} is not signed by the CA in {other}: it was issued by 'CA one', the CA is 'CA two'"
    )
    impostor = write_cert(tmp_path / "impostor.pem", impostor_cert)
    assert inspector.verify_chain(host_path, impostor) == (
        f"{host_path} is not signed by the CA in {impostor}: "
        "the issuer name matches but the signature does not verify with the CA's key"
    )
    bundle = write_cert(tmp_path / "bundle.pem", other_cert, impostor_cert, ca_cert)
    assert inspector.verify_chain(host_path, bundle) is None
    missing = str(tmp_path / "missing.pem")
    assert inspector.verify_chain(host_path, missing) == f"cannot read {missing}: No such file or directory"
    assert inspector.verify_chain(missing, ca_path) == f"cannot read {missing}: No such file or directory"


def test_chain_issuer_must_be_a_ca(tmp_path, inspector):
    peer, peer_key = build("peer")
    host, _ = build("host", issuer=(peer, peer_key))
    host_path, peer_path = write_cert(tmp_path / "host.pem", host), write_cert(tmp_path / "peer.pem", peer)
    assert inspector.verify_chain(host_path, peer_path) == (
        f"{host_path} is not signed by the CA in {peer_path}: "
        f"{peer_path} is not a CA certificate (basicConstraints CA:TRUE is missing)"
    )
    # A self-signed certificate given as its own CA vouches for itself.
    assert inspector.verify_chain(peer_path, peer_path) is None


def rewrite_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as stream:  # same inode, like an editor or `cat new > old`
        stream.truncate(0)
        stream.write(data)


def same_size_pair() -> tuple[bytes, bytes]:
    """Two certificates whose PEM has exactly the same length (Ed25519: fixed-size signatures)."""
    first, _ = build("aaaa", key=ed25519.Ed25519PrivateKey.generate(), serial=1000)
    second, _ = build("bbbb", key=ed25519.Ed25519PrivateKey.generate(), serial=1001)
    pems = tuple(c.public_bytes(serialization.Encoding.PEM) for c in (first, second))
    assert len(pems[0]) == len(pems[1])
    return pems


def test_in_place_rotation_is_seen_immediately(tmp_path, inspector):
    first, second = same_size_pair()
    path = tmp_path / "rotating.pem"
    path.write_bytes(first)
    before = inspector.cert(str(path))
    inode = path.stat().st_ino
    rewrite_in_place(path, second)  # same inode, same size, probably the same mtime tick
    after = inspector.cert(str(path))
    assert path.stat().st_ino == inode
    assert (before.cn, after.cn) == ("aaaa", "bbbb")
    assert before.digest != after.digest


def test_settled_files_are_cached_until_they_change(tmp_path, inspector):
    first, second = same_size_pair()
    path = tmp_path / "cert.pem"
    path.write_bytes(first)
    past = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(past, past))
    cached = inspector.cert(str(path))
    assert inspector.cert(str(path)) is cached
    rewrite_in_place(path, second)
    os.utime(path, ns=(past + 10**9, past + 10**9))
    assert inspector.cert(str(path)).cn == "bbbb"
    path.unlink()
    assert inspector.cert(str(path)).error == f"cannot read {path}: No such file or directory"


def test_key_rotation_by_rename(tmp_path, inspector):
    path = tmp_path / "key.pem"
    write_key(path, ec.generate_private_key(ec.SECP256R1()))
    first = inspector.key(str(path))
    write_key(tmp_path / "new.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    os.replace(tmp_path / "new.pem", path)
    second = inspector.key(str(path))
    assert (first.key_type, second.key_type) == ("ECDSA", "RSA")
    assert first.digest != second.digest


def test_a_psk_only_monitor_never_loads_cryptography():
    # About 10 MB of the monitor's RSS (cryptography and OpenSSL) that only certificates need.
    code = ("import sys\n"
            "import ovs_ipsec.cli.main, ovs_ipsec.daemon.loop, ovs_ipsec.backends.strongswan.backend\n"
            "from ovs_ipsec.pki.inspect import CertificateInspector\n"
            "CertificateInspector().retain(set())\n"
            "try:\n"
            "    ovs_ipsec.cli.main.main(['monitor', '--help'])  # builds every subcommand's parser\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
