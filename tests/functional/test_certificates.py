"""Certificate cases against real charons, with certificates from our own `ovs-ipsec pki` (the tunnels of
each auth mode on both daemons are in test_backend_contract.py)."""

from __future__ import annotations

import shutil

import pytest

from testsupport.tunnels import make_ca_signed, pki, use_certificate, add_pair, add_tunnel, charon_conns, ike_sa_ids
from testsupport.procs import wait_for




@pytest.fixture
def ca_signed(tmp_path):
    make_ca_signed(tmp_path)
    return tmp_path


def test_wrong_peer_name_is_refused_by_the_peer_not_silently_accepted(two_hosts, ca_signed):
    a, b = two_hosts
    use_certificate(a, ca_signed, "hostA", ca=True)
    use_certificate(b, ca_signed, "hostB", ca=True)
    add_tunnel(a, b, "tun", "gre", remote_name="somebody-else")
    add_tunnel(b, a, "tun", "gre", remote_name="hostA")
    a.wait_state("tun", "loaded")
    with pytest.raises(TimeoutError):
        a.wait_ike_up("tun", timeout=6)


def test_bad_certificate_makes_only_certificate_tunnels_invalid(two_hosts, tmp_path):
    a, b = two_hosts
    add_pair(a, b, "psk", "gre", psk="swordfish")
    a.wait_ike_up("psk")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    a.vsctl("set", "Open_vSwitch", ".", f"other_config:certificate={tmp_path}/garbage.pem",
            f"other_config:private_key={tmp_path}/key.pem")
    add_tunnel(a, b, "cert", "geneve", family=6, remote_name="hostB")
    reason = a.wait_state("cert", "invalid")["reason"]
    assert "garbage.pem" in reason
    assert a.tunnel("psk")["ike_sas"] > 0


def test_rotating_the_host_certificate_in_place_reauthenticates_only_its_tunnels(two_hosts, ca_signed):
    a, b = two_hosts
    use_certificate(a, ca_signed, "hostA", ca=True)
    use_certificate(b, ca_signed, "hostB", ca=True)
    add_pair(a, b, "psk6", "gre", family=6, psk="swordfish")  # another peering: must not churn
    add_tunnel(a, b, "tun", "geneve", remote_name="hostB")
    add_tunnel(b, a, "tun", "geneve", remote_name="hostA")
    old_conn = a.wait_ike_up("tun")["conn"]
    psk_conn = a.wait_ike_up("psk6")["conn"]
    psk_sa = ike_sa_ids(a)[psk_conn]

    # A new key and certificate for hostA, written over the same paths, as an operator would.
    renewal = ca_signed / "renewal"
    renewal.mkdir()
    shutil.copytree(ca_signed / "pki", renewal / "pki")
    pki(renewal, "req", "hostA")
    pki(renewal, "sign", "hostA", "switch")
    for suffix in ("privkey.pem", "cert.pem"):
        (ca_signed / f"hostA-{suffix}").write_bytes((renewal / f"hostA-{suffix}").read_bytes())

    a.appctl("refresh")
    new_conn = wait_for(lambda: (t := a.tunnel("tun")) and t["conn"] != old_conn and t["ike_sas"] > 0
                        and t["conn"], 30, what="tunnel re-established with the new certificate")
    assert old_conn not in charon_conns(a) and new_conn in charon_conns(a)
    b.wait_ike_up("tun")
    assert ike_sa_ids(a)[psk_conn] == psk_sa  # the PSK peering was not touched
