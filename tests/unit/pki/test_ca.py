"""`ovs-ipsec pki`: the ovs-pki work-alike, driven through `main([...])` in a temporary directory."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ovs_ipsec.atomicfile import write_atomic
from ovs_ipsec.errors import FileWriteError, OvsIpsecError, PkiError
from ovs_ipsec.pki import ca, files
from ovs_ipsec.pki.cli import add_parser, main
from ovs_ipsec.pki.inspect import CertificateInspector, cert_problems, key_matches


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """ovs-pki writes NAME-*.pem to the current directory: give each test its own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pki(*argv: str) -> int:
    return main(list(argv))


def load(path: str | Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_tutorial_flow(workdir):
    """The OVS IPsec tutorial's commands, with `ovs-ipsec pki` for `ovs-pki` and a private --dir."""
    d = f"--dir={workdir / 'pki'}"
    assert pki(d, "init") == 0
    assert pki("req", "-u", "host_1") == 0
    assert pki("self-sign", "host_1") == 0
    assert pki(d, "req", "-u", "host_2") == 0
    assert pki(d, "sign", "host_2", "switch") == 0

    cacert = workdir / "pki" / "switchca" / "cacert.pem"
    inspector = CertificateInspector()
    for name in ("host_1", "host_2"):
        facts = inspector.cert(f"{name}-cert.pem")
        assert (facts.error, facts.cn, facts.san_dns) == (None, name, (name,))
        assert key_matches(facts, inspector.key(f"{name}-privkey.pem"))
        assert mode(f"{name}-privkey.pem") == 0o600
    assert inspector.verify_chain("host_2-cert.pem", str(cacert)) is None
    assert inspector.verify_chain("host_1-cert.pem", "host_1-cert.pem") is None
    assert inspector.verify_chain("host_1-cert.pem", str(cacert)) is not None


def test_init_layout_matches_ovs_pki(workdir):
    assert pki("--dir", "pki", "init") == 0
    for kind in ("switchca", "controllerca"):
        base = workdir / "pki" / kind
        assert mode(base / "private") == 0o700
        assert mode(base / "private" / "cakey.pem") == 0o600
        assert mode(base / "cacert.pem") == 0o644
        assert (base / "newcerts").is_dir() and (base / "index.txt").read_text() == ""
        cert = load(base / "cacert.pem")
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        assert kind in cert.subject.rfc4514_string()
    assert not list(workdir.rglob(".*.tmp"))


def test_init_refuses_to_replace_a_ca_without_force(workdir, capsys):
    assert pki("--dir", "pki", "init") == 0
    first = (workdir / "pki/switchca/cacert.pem").read_bytes()
    assert pki("--dir", "pki", "init") == 1
    assert "pki/switchca/cacert.pem already exists (use --force to overwrite it)" in capsys.readouterr().err
    assert pki("--dir", "pki", "init", "--force") == 0
    assert (workdir / "pki/switchca/cacert.pem").read_bytes() != first
    assert mode(workdir / "pki/switchca/private/cakey.pem") == 0o600


def test_host_certificate_profile(workdir):
    assert pki("-d", "pki", "init") == 0
    assert pki("-d", "pki", "req+sign", "gw-1.example") == 0
    cert = load("gw-1.example-cert.pem")
    assert cert.version == x509.Version.v3
    ext = cert.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw-1.example"]
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ExtendedKeyUsageOID.SERVER_AUTH in ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)  # ECDSA P-256 by default
    assert cert.public_key().curve.name == "secp256r1"
    # Something follows the CN in RFC 2253 order, as the upstream monitor's `CN=(.+?),` needs.
    assert cert.subject.rfc4514_string().startswith("CN=gw-1.example,")


@pytest.mark.parametrize("bits", ["2048", "3072"])
def test_rsa_keys(workdir, bits):
    assert pki("req", "host", "--key-type", "rsa", "--bits", bits) == 0
    assert pki("self-sign", "host") == 0
    key = CertificateInspector().key("host-privkey.pem")
    assert key.key_type == "RSA"
    public = load("host-cert.pem").public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == int(bits)


def test_days_and_ca_lifetime_cap(workdir):
    assert pki("--dir", "pki", "--days", "10", "init") == 0
    assert pki("req", "short", "--days", "5") == 0
    assert pki("self-sign", "short", "--days", "5") == 0
    cert = load("short-cert.pem")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=5) + ca.CLOCK_SKEW
    assert pki("req", "long") == 0
    assert pki("--dir", "pki", "sign", "long", "--days", "100") == 0
    # never trusted longer than the CA that vouches for it
    assert load("long-cert.pem").not_valid_after_utc == load("pki/switchca/cacert.pem").not_valid_after_utc


def test_private_keys_are_0600_even_with_an_open_umask(workdir):
    old = os.umask(0)
    try:
        assert pki("req", "host") == 0
        assert pki("req", "host", "--force") == 0
    finally:
        os.umask(old)
    assert mode("host-privkey.pem") == 0o600
    assert mode("host-req.pem") == 0o644


def test_req_refuses_to_overwrite(workdir, capsys):
    assert pki("req", "host") == 0
    key = Path("host-privkey.pem").read_bytes()
    assert pki("req", "host") == 1
    assert "host-privkey.pem already exists (use --force to overwrite it)" in capsys.readouterr().err
    assert Path("host-privkey.pem").read_bytes() == key


def test_sign_records_the_certificate(workdir):
    assert pki("--dir", "pki", "init") == 0
    assert pki("req", "host") == 0
    assert pki("--dir", "pki", "sign", "host", "controller") == 0
    cert = load("host-cert.pem")
    assert cert.issuer == load("pki/controllerca/cacert.pem").subject
    serial = f"{cert.serial_number:X}"
    serial = serial if len(serial) % 2 == 0 else f"0{serial}"  # openssl ca's even-length hex
    copy = workdir / "pki/controllerca/newcerts" / f"{serial}.pem"
    assert copy.read_bytes() == Path("host-cert.pem").read_bytes()
    line = (workdir / "pki/controllerca/index.txt").read_text()
    assert line.startswith("V\t")
    assert line.endswith(f"\t\t{serial}\tunknown\t/O=Open vSwitch/OU=Open vSwitch certifier/CN=host\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--dir", "nowhere", "sign", "host"],
            "no switch CA in nowhere/switchca: run 'ovs-ipsec pki --dir nowhere init' first",
        ),
        (["self-sign", "ghost"], "cannot read ghost-privkey.pem: No such file or directory"),
        (["req", "bad/name"], "invalid name 'bad/name'"),
        (["req", "host", "-k", "ecdsa", "-B", "2048"], "ECDSA keys have 256 or 384 bits, not 2048"),
        (["req", "host", "-k", "rsa", "-B", "1024"], "RSA keys have 2048, 3072, 4096 bits, not 1024"),
        (["show", "missing.pem"], "cannot read missing.pem: No such file or directory"),
    ],
)
def test_user_errors_are_one_clear_line(workdir, capsys, argv, message):
    assert pki(*argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_sign_refuses_an_expired_ca(workdir, capsys):
    layout = files.PkiLayout(workdir / "pki")
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    ca.save_authority(layout, "switch", ca.make_authority("switch", ca.DEFAULT_KEY, 30, long_ago), force=False)
    assert pki("req", "host") == 0
    assert pki("--dir", "pki", "sign", "host") == 1
    assert "pki/switchca/cacert.pem expired on 2020-01-31 00:00:00 UTC" in capsys.readouterr().err
    assert not Path("host-cert.pem").exists()


def test_broken_inputs_name_the_file(workdir, capsys):
    assert pki("req", "a") == 0 and pki("req", "b") == 0
    os.replace("b-privkey.pem", "a-privkey.pem")
    assert pki("self-sign", "a") == 1
    assert "a-privkey.pem is not the private key of a-req.pem" in capsys.readouterr().err
    Path("a-req.pem").write_text("garbage\n")
    assert pki("self-sign", "a") == 1
    assert "a-req.pem is not a PEM certificate request" in capsys.readouterr().err


def test_usage_errors_exit_2(workdir, capsys):
    assert pki("frobnicate") == 2
    assert pki("req", "host", "--days", "0") == 2
    assert pki("--help") == 0
    capsys.readouterr()


def test_show_never_prints_the_key(workdir, capsys):
    assert pki("req", "host") == 0
    capsys.readouterr()
    assert pki("show", "host-privkey.pem") == 0
    out = capsys.readouterr().out
    body = Path("host-privkey.pem").read_text().splitlines()[1]
    assert "ECDSA" in out and body[:16] not in out and "BEGIN" not in out
    assert pki("show", "host-req.pem") == 0
    assert "CN=host" in capsys.readouterr().out
    assert pki("self-sign", "host") == 0 and pki("show", "host-cert.pem") == 0
    assert "Status:      OK" in capsys.readouterr().out


def test_verify_command(workdir, capsys):
    assert pki("-d", "pki", "init") == 0
    assert pki("-d", "pki", "req+sign", "h1") == 0 and pki("req", "h2") == 0 and pki("self-sign", "h2") == 0
    capsys.readouterr()
    ca_file = "pki/switchca/cacert.pem"
    assert pki("verify", "h1-cert.pem", "--ca", ca_file, "--name", "h1", "--key", "h1-privkey.pem") == 0
    assert capsys.readouterr().out.strip() == "h1-cert.pem: OK"
    assert pki("-d", "pki", "verify", "h1", "switch") == 0  # ovs-pki's `verify NAME TYPE` form
    assert pki("verify", "h1-cert.pem", "--name", "h2", "--key", "h2-privkey.pem") == 1
    out = capsys.readouterr().out
    assert "the CN is 'h1', not 'h2'" in out and "h2-privkey.pem is not the private key of h1-cert.pem" in out
    assert pki("verify", "h2-cert.pem", "--ca", ca_file) == 1
    assert "h2-cert.pem is not signed by the CA in pki/switchca/cacert.pem" in capsys.readouterr().out


def test_add_parser_wires_a_pki_subcommand(workdir):
    parser = argparse.ArgumentParser(prog="ovs-ipsec")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pki", "init", "--dir", str(workdir / "pki")])
    assert args.func(args) == 0
    assert (workdir / "pki/switchca/cacert.pem").exists()


def test_module_entry_point(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "ovs_ipsec.cli.pki_main", "req", "-u", "host_9"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert Path("host_9-req.pem").exists() and mode("host_9-privkey.pem") == 0o600


def test_write_atomic_never_clobbers(workdir):
    target = workdir / "file.pem"
    write_atomic(target, b"one", secret=True, overwrite=False)
    with pytest.raises(FileWriteError, match="already exists"):
        write_atomic(target, b"two", secret=True, overwrite=False)
    assert target.read_bytes() == b"one"
    write_atomic(target, b"three", secret=True, overwrite=True)
    assert target.read_bytes() == b"three" and mode(target) == 0o600
    assert sorted(p.name for p in workdir.iterdir()) == ["file.pem"]


def test_library_builds_without_files():
    now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    authority = ca.make_authority("switch", ca.DEFAULT_KEY, 365, now)
    key = ca.generate_key(ca.KeySpec.parse("ecdsa", 384))
    cert = ca.issue(ca.make_request(key, "edge"), authority, 30, now)
    cert.verify_directly_issued_by(authority.cert)
    assert cert.not_valid_before_utc == now - ca.CLOCK_SKEW
    assert "PrivateKey" not in repr(authority)
    with pytest.raises(PkiError, match="does not belong"):
        ca.self_sign(ca.make_request(key, "edge"), ca.generate_key(ca.DEFAULT_KEY), 30, now)


def test_certificates_are_valid_now(workdir):
    assert pki("req", "h") == 0 and pki("self-sign", "h") == 0
    facts = CertificateInspector().cert("h-cert.pem")
    assert cert_problems(facts, dt.datetime.now(dt.UTC).timestamp()) is None


def test_every_error_of_the_pki_and_the_writer_is_an_ovs_ipsec_error(workdir):
    assert issubclass(PkiError, OvsIpsecError) and issubclass(FileWriteError, OvsIpsecError)
    (workdir / "taken").mkdir()
    with pytest.raises(OvsIpsecError):  # writing over a directory: an error the caller catches
        write_atomic(workdir / "taken", b"x", secret=True, overwrite=True)
