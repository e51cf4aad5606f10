"""LibreSwan's own cases, against real plutos (the contract both daemons share is in
test_backend_contract.py). pluto runs from the extracted Debian package (scripts/setup-libreswan.sh),
in the sandbox's namespaces.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ovs_ipsec.backends.libreswan import parse
from testsupport.daemons import libreswan_missing
from testsupport.procs import wait_for
from testsupport.tunnels import add_pair, add_tunnel, connect_with_certificates, make_ca_signed, pki, use_certificate


def our_nicknames(host) -> set[str]:
    listing = subprocess.run(["certutil", "-L", "-d", f"sql:{host.lsw_root}/nss"], capture_output=True, text=True)
    return parse.nss_nicknames(listing.stdout)


def test_libreswan_nss_holds_exactly_our_certificate_key_and_ca(lsw_hosts, tmp_path):
    a, b = lsw_hosts
    make_ca_signed(tmp_path)  # ECDSA P-256, our PKI's default: pluto signs with authby ecdsa
    connect_with_certificates(a, b, tmp_path, "geneve", ca=True)
    assert len(our_nicknames(a)) == 2  # our certificate and key, the CA


def test_libreswan_rsa_certificates_work_too(lsw_hosts, tmp_path):
    a, b = lsw_hosts
    pki(tmp_path, "init", "-k", "rsa")
    for name in ("hostA", "hostB"):
        pki(tmp_path, "req", "-k", "rsa", name)
        pki(tmp_path, "sign", name, "switch")
    use_certificate(a, tmp_path, "hostA", ca=True)
    use_certificate(b, tmp_path, "hostB", ca=True)
    add_tunnel(a, b, "tun", "geneve", remote_name="hostB")
    add_tunnel(b, a, "tun", "geneve", remote_name="hostA")
    for host in (a, b):
        assert host.wait_ike_up("tun")["auth"] == "ca-cert"


def test_libreswan_rotated_certificate_replaces_the_old_one_in_nss(lsw_hosts, tmp_path):
    a, b = lsw_hosts
    make_ca_signed(tmp_path)
    use_certificate(a, tmp_path, "hostA", ca=True)
    use_certificate(b, tmp_path, "hostB", ca=True)
    add_tunnel(a, b, "tun", "geneve", remote_name="hostB")
    add_tunnel(b, a, "tun", "geneve", remote_name="hostA")
    old_conn = a.wait_ike_up("tun")["conn"]
    nicknames = our_nicknames(a)
    pki(tmp_path, "req", "--force", "hostA")  # a new key and certificate, same name, same paths
    pki(tmp_path, "sign", "--force", "hostA", "switch")
    a.appctl("refresh")
    wait_for(lambda: (t := a.tunnel("tun")) and t["conn"] != old_conn and t["ike_sas"] > 0, 60,
             what="re-established with the new certificate")
    assert our_nicknames(a) == nicknames  # replaced under the same names, nothing piled up
    listing = subprocess.run(["certutil", "-L", "-d", f"sql:{a.lsw_root}/nss", "-a", "-n",
                              min(n for n in nicknames if "-key-" in n)], capture_output=True, text=True).stdout
    assert listing.count("BEGIN CERTIFICATE") == 1
    assert "".join((tmp_path / "hostA-cert.pem").read_text().split()[2:-2]) in "".join(listing.split())


def test_libreswan_files_one_per_peering_secrets_private(lsw_hosts):
    a, b = lsw_hosts
    add_pair(a, b, "gnv", "geneve", psk="swordfish")
    add_tunnel(a, b, "six", "gre", family=6, psk="other")
    add_tunnel(b, a, "six", "gre", family=6, psk="other")
    conn = a.wait_ike_up("gnv")["conn"]
    conn6 = a.wait_ike_up("six")["conn"]
    folder = a.lsw_root / "etc/ipsec.d"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{conn}.conf", f"{conn}.secrets", f"{conn6}.conf", f"{conn6}.secrets", "ovsipsec-updown"])
    for name in (f"{conn}.secrets", f"{conn6}.secrets"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    other_before = (folder / f"{conn6}.conf").stat()
    add_pair(a, b, "vx", "vxlan", psk="swordfish")  # joins the IPv4 peering: only its file changes
    wait_for(lambda: a.tunnel("vx") and a.tunnel("vx")["ike_sas"] > 0, 30, what="vx established")
    assert "_vx-out-" in (folder / f"{conn}.conf").read_text()
    after = (folder / f"{conn6}.conf").stat()
    assert (after.st_ino, after.st_mtime_ns) == (other_before.st_ino, other_before.st_mtime_ns)
    assert "swordfish" not in a.log_text() and "swordfish" not in (folder / f"{conn}.conf").read_text()


def test_libreswan_status_and_unixctl_match_the_contract(lsw_hosts):
    a, b = lsw_hosts
    add_pair(a, b, "tun", "geneve", psk="Sup3rS3cretPSK")
    a.wait_ike_up("tun")
    shown = a.appctl("tunnels/show") + a.appctl("tunnels/show", "--json") + a.appctl("ipsec/status")
    assert "Sup3rS3cretPSK" not in shown and "PSK:            <hidden>" in shown
    cli = [sys.executable, "-m", "ovs_ipsec.cli.main", "status", f"--unixctl={a.unixctl}", "--json"]
    (tunnel,) = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True).stdout)["tunnels"]
    assert {"name", "type", "local_ip", "remote_ip", "auth", "state", "reason", "ike_sas", "child_sas"} <= tunnel.keys()
    assert tunnel["ike_sas"] > 0 and tunnel["ike_sas"] == 1


@pytest.mark.parametrize("case", ["libreswan4_geneve_psk", "libreswan4_vxlan_custom_port_forceencaps",
                                  "libreswan4_gre_ipv6_every_option", "libreswan4_ipv6_no_local_ip",
                                  "libreswan4_shared_peering", "libreswan_gre_ipv6_options", "libreswan_default_crypto"])
def test_libreswan_golden_configurations_load_into_real_pluto(sandbox, case):
    """Every option the renderer writes (see tests/unit/golden) is accepted by pluto 4.10 itself."""
    reason = libreswan_missing()
    if reason:
        pytest.skip(reason)
    host = sandbox.add_host("a", "10.0.0.1/24", "fd00::1/64", ike_daemon="libreswan")
    host.start_pluto()
    text = (Path(__file__).parents[1] / "unit/golden" / f"{case}.conf").read_text()
    names = [line.split()[1] for line in text.splitlines() if line.startswith("conn ")]
    path = host.lsw_root / "etc/ipsec.d" / "golden.conf"
    path.write_text(text)
    result = subprocess.run([f"{host.lsw_root}/usr/sbin/ipsec", "addconn", "--ctlsocket", host.pluto_ctl,
                             "--config", str(path), *names], capture_output=True, text=True, timeout=30)
    assert parse.problem(result.stdout, result.stderr, result.returncode) is None
    assert set(names) <= parse.loaded_conns(host.whack("--status"))
