"""Interoperability of `ovs-ipsec pki` with the real tools: openssl, Debian's ovs-pki, strongSwan's pki."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ovs_ipsec.pki.inspect import CertificateInspector, key_matches

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]
needs_ovs_pki = pytest.mark.skipif(shutil.which("ovs-pki") is None, reason="needs Debian's ovs-pki")
needs_strongswan_pki = pytest.mark.skipif(shutil.which("pki") is None, reason="needs strongSwan's pki")


def ovs_ipsec_pki(cwd: Path, *argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ovs_ipsec.cli.pki_main", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"ovs-ipsec pki {' '.join(argv)}: {result.stderr}"
    return result.stdout


def ovs_pki(cwd: Path, pki_dir: Path, *argv: str) -> str:
    # --log keeps the real ovs-pki away from /var/log/openvswitch.
    command = ["ovs-pki", f"--dir={pki_dir}", f"--log={cwd / 'ovs-pki.log'}", *argv]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return result.stdout


def openssl(*argv: str | Path) -> str:
    result = subprocess.run(["openssl", *map(str, argv)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(map(str, argv))}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory) -> Path:
    """The OVS IPsec tutorial, word for word, with `ovs-ipsec pki` and a private PKI directory."""
    work = tmp_path_factory.mktemp("tutorial")
    pki_dir = f"--dir={work / 'pki'}"
    ovs_ipsec_pki(work, pki_dir, "init")
    ovs_ipsec_pki(work, "req", "-u", "host_1")
    ovs_ipsec_pki(work, "self-sign", "host_1")
    ovs_ipsec_pki(work, "req", "-u", "host_2")
    ovs_ipsec_pki(work, pki_dir, "sign", "host_2", "switch")
    ovs_ipsec_pki(work, "req", "-u", "host_3")
    ovs_ipsec_pki(work, pki_dir, "sign", "host_3", "switch")
    return work


def test_tutorial_files(tutorial):
    for name in ("host_1", "host_2", "host_3"):
        for suffix in ("privkey", "req", "cert"):
            assert (tutorial / f"{name}-{suffix}.pem").is_file()
        assert stat.S_IMODE(os.stat(tutorial / f"{name}-privkey.pem").st_mode) == 0o600
    # the path the tutorial copies to the other host
    assert (tutorial / "pki" / "switchca" / "cacert.pem").is_file()
    assert stat.S_IMODE(os.stat(tutorial / "pki" / "switchca" / "private" / "cakey.pem").st_mode) == 0o600


def test_openssl_accepts_ca_signed_certificates(tutorial):
    cacert = tutorial / "pki" / "switchca" / "cacert.pem"
    for name in ("host_2", "host_3"):
        verdict = openssl("verify", "-x509_strict", "-CAfile", cacert, tutorial / f"{name}-cert.pem")
        assert verdict.strip().endswith(": OK")
        text = openssl("x509", "-in", tutorial / f"{name}-cert.pem", "-noout", "-text")
        assert "Version: 3 (0x2)" in text
        assert f"DNS:{name}" in text and f"CN = {name}" in text
        assert "Digital Signature" in text
    self_signed = tutorial / "host_1-cert.pem"
    assert openssl("verify", "-CAfile", self_signed, self_signed).strip().endswith(": OK")
    # a self-signed host certificate is not a CA: it must not vouch for another host
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", self_signed, tutorial / "host_2-cert.pem"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0


def test_openssl_accepts_the_private_keys(tutorial):
    for name in ("host_1", "host_2"):
        key_pub = openssl("pkey", "-in", tutorial / f"{name}-privkey.pem", "-pubout")
        cert_pub = openssl("x509", "-in", tutorial / f"{name}-cert.pem", "-noout", "-pubkey")
        assert key_pub == cert_pub


@needs_strongswan_pki
def test_strongswan_trusts_the_chain(tutorial):
    cacert = tutorial / "pki" / "switchca" / "cacert.pem"
    result = subprocess.run(
        ["pki", "--verify", "--in", tutorial / "host_2-cert.pem", "--cacert", cacert],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "certificate trusted" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def real_ovs_pki(tmp_path_factory) -> Path:
    """Certificates made by Debian's ovs-pki, as an operator following the tutorial would."""
    if shutil.which("ovs-pki") is None:
        pytest.skip("needs Debian's ovs-pki")
    work = tmp_path_factory.mktemp("ovs-pki")
    pki_dir = work / "pki"
    ovs_pki(work, pki_dir, "init")
    ovs_pki(work, pki_dir, "req", "-u", "host_1")
    ovs_pki(work, pki_dir, "self-sign", "host_1")
    ovs_pki(work, pki_dir, "req", "-u", "host_2")
    ovs_pki(work, pki_dir, "-b", "sign", "host_2", "switch")
    ovs_pki(work, pki_dir, "req", "plain")  # without -u: CN "plain id:<uuid>"
    return work


@needs_ovs_pki
def test_inspector_accepts_ovs_pki_certificates(real_ovs_pki):
    inspector = CertificateInspector()
    cacert = str(real_ovs_pki / "pki" / "switchca" / "cacert.pem")
    ca = inspector.cert(cacert)
    assert ca.error is None and ca.is_ca  # ovs-pki puts a text dump before the PEM block
    for name in ("host_1", "host_2"):
        facts = inspector.cert(str(real_ovs_pki / f"{name}-cert.pem"))
        assert (facts.error, facts.cn, facts.san_dns) == (None, name, (name,))
        key = inspector.key(str(real_ovs_pki / f"{name}-privkey.pem"))
        assert key.error is None and key.key_type == "RSA" and key_matches(facts, key)
    assert inspector.verify_chain(str(real_ovs_pki / "host_2-cert.pem"), cacert) is None
    self_signed = str(real_ovs_pki / "host_1-cert.pem")
    assert inspector.verify_chain(self_signed, self_signed) is None
    assert inspector.verify_chain(self_signed, cacert) is not None


@needs_ovs_pki
def test_our_sign_on_an_ovs_pki_ca(real_ovs_pki):
    """Drop-in: an existing ovs-pki CA keeps working, and ovs-pki agrees with what we signed."""
    pki_dir = real_ovs_pki / "pki"
    ovs_ipsec_pki(real_ovs_pki, f"--dir={pki_dir}", "sign", "plain", "switch")
    facts = CertificateInspector().cert(str(real_ovs_pki / "plain-cert.pem"))
    assert facts.error is None and facts.cn.startswith("plain id:") and facts.san_dns == (facts.cn,)
    assert "plain-cert.pem: OK" in ovs_pki(real_ovs_pki, pki_dir, "verify", "plain", "switch")
    out = ovs_ipsec_pki(real_ovs_pki, f"--dir={pki_dir}", "verify", "host_2", "switch")
    assert out.strip().endswith("host_2-cert.pem: OK")


@needs_ovs_pki
def test_ovs_pki_verifies_our_certificates(tutorial, tmp_path):
    """ovs-pki's own `verify NAME switch` accepts a certificate signed by our CA."""
    shutil.copy(tutorial / "host_2-cert.pem", tmp_path / "host_2-cert.pem")
    assert "host_2-cert.pem: OK" in ovs_pki(tmp_path, tutorial / "pki", "verify", "host_2", "switch")
