"""`make deb` (scripts/build-deb.sh): the package Debian's tools build, as apt would install it.

Builds the real .deb (dpkg-buildpackage + debhelper; the pinned wheels come from PyPI), then reads
it with dpkg-deb and runs its commands from an extracted copy with Debian's own python3, the way
the installed wrappers run them. The systemd-host lab scenarios install it for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deb():
    if shutil.which("dpkg-buildpackage") is None or os.geteuid() != 0:
        pytest.skip("needs root and dpkg-dev (make setup) to build the package")
    done = subprocess.run([str(REPO / "scripts/build-deb.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return REPO / done.stdout.strip().splitlines()[-1]


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout.strip()


def test_depends_on_debian_packages_only_and_charon_with_vici(deb):
    depends = field(deb, "Depends")
    for package in ("charon-systemd", "strongswan-swanctl", "python3-openvswitch", "openvswitch-switch",
                    "python3 (<< 3.12)"):
        assert package in depends
    assert "python3-cryptography" not in depends   # Debian 12's is 38: the package carries >= 42


def test_contents_product_units_man_pages_conffiles_and_no_test_harness(deb):
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in ("/usr/bin/ovs-ipsec", "/usr/sbin/ovs-monitor-ipsec", "/lib/systemd/system/ovs-ipsec.service",
                 "/lib/systemd/system/ovs-ipsec-guard.service", "/etc/logrotate.d/ovs-ipsec",
                 "/etc/strongswan.d/ovs-ipsec.conf", "/usr/share/man/man8/ovs-ipsec.8.gz",
                 "/usr/share/man/man8/ovs-monitor-ipsec.8.gz", "/usr/lib/ovs-ipsec/lib/vici/__init__.py",
                 "/usr/lib/ovs-ipsec/lib/ovs_ipsec/cli/main.py"):
        assert path in files, path
    assert not [f for f in files if "sandbox" in f or "/tests/" in f]
    assert not [f for f in files if f.startswith("/usr/lib/ovs-ipsec/lib/ovs/")]   # Debian's python3-openvswitch
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", deb], capture_output=True, check=True).stdout
    assert b"/etc/logrotate.d/ovs-ipsec" in conffiles and b"/etc/default/ovs-ipsec" in conffiles


def test_its_commands_run_on_debians_python_with_the_private_library(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-x", deb, tmp_path], check=True)
    lib = tmp_path / "usr/lib/ovs-ipsec/lib"
    # The wrapper as installed, pointed at the extracted library (its only difference).
    wrapper = (tmp_path / "usr/bin/ovs-ipsec").read_text()
    assert wrapper.startswith("#!/usr/bin/python3 -IS\n")
    local = tmp_path / "ovs-ipsec"
    local.write_text(wrapper.replace("/usr/lib/ovs-ipsec/lib", str(lib)))
    local.chmod(0o755)
    probe = ("import sys; sys.path[:0] = [%r]; sys.path.append('/usr/lib/python3/dist-packages'); "
             "import ovs, cryptography, vici, ovs_ipsec.cli.main; "
             "print(ovs.__file__, cryptography.__version__)") % str(lib)
    done = subprocess.run(["/usr/bin/python3", "-IS", "-c", probe], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": "/nowhere", "PATH": os.environ["PATH"]})
    ovs_file, crypto = done.stdout.split()
    assert ovs_file.startswith("/usr/lib/python3/dist-packages/ovs/")
    assert tuple(int(x) for x in crypto.split(".")[:2]) >= (42, 0)
    version = subprocess.run([local, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == "ovs-ipsec 0.1.0"
