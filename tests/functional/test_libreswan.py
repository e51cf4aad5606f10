"""The backend contract against both IKE daemons, and LibreSwan's own cases, against real plutos.

The contract cases run once per daemon (`swan` is parametrized): whatever the daemon, the same
OVSDB input gives the same status, and only our own objects are ever touched. pluto runs from
the extracted Debian package (scripts/setup-libreswan.sh), in the sandbox's namespaces.

On this host's kernel Child SAs cannot be installed (no ESP), so `established` means the IKE SA
is up; the real-kernel lab proves the data path.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testsupport.tunnels import connect_with_certificates, make_ca_signed, make_self_signed, pki, use_certificate, add_pair, add_tunnel, charon_conns, charon_secrets, ike_sa_ids
from ovs_ipsec.backends.libreswan import parse, render
from testsupport.pluto import LIBRESWAN_ROOT
from testsupport.procs import wait_for



# -- what the contract needs to know about each daemon ------------------------------------------------

class StrongSwan:
    name = "strongswan"
    other_ike = "aes128gcm16-prfsha256-ecp256"

    def ike_sa_ids(self, host):
        return ike_sa_ids(host)

    def conns(self, host):
        return charon_conns(host)

    def secrets(self, host):
        return charon_secrets(host)

    def children(self, host, conn):
        return {c.split("-")[0] for event in host.vici().list_conns({"ike": conn}) for c in event[conn]["children"]}

    def add_foreign(self, host):
        session = host.vici()
        session.load_conn({"myvpn-2": {"remote_addrs": ["10.231.0.99"], "local": {"auth": "psk"},
                                       "remote": {"auth": "psk"}, "children": {"net": {}}}})
        session.load_shared({"id": "myvpn", "type": "IKE", "data": "foreign", "owners": ["10.231.0.99"]})


class LibreSwan:
    name = "libreswan"
    other_ike = "aes_gcm128-sha2_256"

    def ike_sa_ids(self, host):
        """{peering (or foreign connection): serial of its established IKE SA} straight from pluto."""
        ids = {}
        for state in parse.states(host.whack("--showstates")):
            if not state.child and state.established:
                ids[_peering(state.conn)] = f"#{state.serial}"
        return ids

    def conns(self, host):
        return {_peering(name) for name in parse.loaded_conns(host.whack("--status"))}

    def secrets(self, host):
        return {path.stem for path in (host.lsw_root / "etc/ipsec.d").glob("*.secrets")}

    def children(self, host, conn):
        return {name.split("_", 1)[1].split("-")[0] for name in parse.loaded_conns(host.whack("--status"))
                if render.split_name(name) and render.split_name(name)[0] == conn
                and render.split_name(name)[1] != render.ANCHOR}

    def add_foreign(self, host):
        """A hand-made connection and secret, in the place an operator would put them."""
        folder = host.lsw_root / "etc/ipsec.d"
        (folder / "myvpn.conf").write_text("conn myvpn-2\n    left=10.231.0.1\n    right=10.231.0.99\n"
                                           "    authby=secret\n    auto=add\n")
        (folder / "myvpn.secrets").write_text('10.231.0.1 10.231.0.99 : PSK "foreign-foreign"\n')
        host.ipsec("addconn", "--ctlsocket", host.pluto_ctl, "--config", str(folder / "myvpn.conf"), "myvpn-2")
        host.whack("--rereadsecrets")


def _peering(pluto_name):
    parts = render.split_name(pluto_name)
    return parts[0] if parts else pluto_name


def _libreswan_missing():
    if not os.path.exists(f"{LIBRESWAN_ROOT}/usr/libexec/ipsec/pluto"):
        return f"LibreSwan is not extracted in {LIBRESWAN_ROOT} (run scripts/setup-libreswan.sh)"
    if not os.path.exists("/usr/bin/certutil"):
        return "certutil is missing (libnss3-tools; run scripts/setup-libreswan.sh)"
    return None


@pytest.fixture(params=[StrongSwan(), LibreSwan()], ids=lambda swan: swan.name)
def swan(request):
    if request.param.name == "libreswan" and _libreswan_missing():
        pytest.skip(_libreswan_missing())
    return request.param


def make_hosts(sandbox, daemon):
    a = sandbox.add_host("a", "10.231.0.1/24", "fd00:231::1/64", ike_daemon=daemon)
    b = sandbox.add_host("b", "10.231.0.2/24", "fd00:231::2/64", ike_daemon=daemon)
    for host in (a, b):
        host.start_ovsdb()
        host.start_ike_daemon()
        host.start_monitor()
    return a, b


@pytest.fixture
def hosts(sandbox, swan):
    return make_hosts(sandbox, swan.name)


@pytest.fixture
def lsw_hosts(sandbox):
    reason = _libreswan_missing()
    if reason:
        pytest.skip(reason)
    return make_hosts(sandbox, "libreswan")


# -- the contract: the same cases, both daemons -------------------------------------------------------

@pytest.mark.parametrize("tunnel_type", ["gre", "geneve", "vxlan"])
def test_psk_tunnel_reaches_established_on_both_sides(hosts, swan, tunnel_type):
    a, b = hosts
    add_pair(a, b, "tun", tunnel_type, psk="swordfish")
    for host in (a, b):
        tunnel = host.wait_ike_up("tun")
        assert tunnel["ike_sas"] == 1 and tunnel["auth"] == "psk" and tunnel["reason"].startswith("the IKE SA is up; 0 of ")
    assert a.tunnel("tun")["initiator"] != b.tunnel("tun")["initiator"]


def test_deleting_the_last_tunnel_to_a_peer_removes_its_connection_secret_and_sa(hosts, swan):
    a, b = hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    add_tunnel(a, b, "keep", "gre", family=6, psk="other")  # another peer (over IPv6): must not be touched
    add_tunnel(b, a, "keep", "gre", family=6, psk="other")
    conn = a.wait_ike_up("tun")["conn"]
    kept = a.wait_ike_up("keep")["conn"]
    kept_sa = swan.ike_sa_ids(a)[kept]
    a.vsctl("del-port", "tun")
    wait_for(lambda: conn not in swan.conns(a), 10, what="connection removal")
    assert conn not in swan.secrets(a)
    wait_for(lambda: conn not in swan.ike_sa_ids(a), 10, what="IKE SA termination")
    assert a.tunnel("tun") is None
    assert swan.ike_sa_ids(a)[kept] == kept_sa


def test_tunnels_to_the_same_peer_share_one_ike_sa_and_leave_it_one_by_one(hosts, swan):
    a, b = hosts
    add_pair(a, b, "gnv", "geneve", psk="swordfish")
    conn = a.wait_ike_up("gnv")["conn"]
    conn_b = b.wait_ike_up("gnv")["conn"]
    sa_a, sa_b = swan.ike_sa_ids(a)[conn], swan.ike_sa_ids(b)[conn_b]
    add_pair(a, b, "gre", "gre", psk="swordfish")
    assert a.wait_ike_up("gre")["conn"] == conn
    b.wait_ike_up("gre")
    assert swan.ike_sa_ids(a)[conn] == sa_a  # adding a tunnel did not re-key the peering
    assert swan.children(a, conn) == {"gnv", "gre"}
    for host in (a, b):  # on both ends: the initiator's and the responder's IKE SA must survive
        host.vsctl("del-port", "gnv")
    for host, name in ((a, conn), (b, conn_b)):
        wait_for(lambda: host.tunnel("gnv") is None, 10, what="gnv removed from status")
        wait_for(lambda: swan.children(host, name) == {"gre"}, 10, what="gnv's children removed")
    assert swan.ike_sa_ids(a)[conn] == sa_a and swan.ike_sa_ids(b)[conn_b] == sa_b
    assert a.tunnel("gre")["ike_sas"] > 0


def test_monitor_restart_without_change_touches_nothing_in_the_daemon(hosts, swan):
    a, b = hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    a.wait_ike_up("tun")
    before = (swan.ike_sa_ids(a), swan.conns(a), swan.secrets(a))
    log_before = len(a.log_text())
    a.stop_monitor(cleanup=False)
    assert swan.ike_sa_ids(a) == before[0]  # --no-cleanup leaves everything up
    a.start_monitor()
    a.wait_ike_up("tun")
    a.appctl("refresh")
    assert (swan.ike_sa_ids(a), swan.conns(a), swan.secrets(a)) == before
    assert "LoadConn" not in a.log_text()[log_before:]  # the pass summary names every action kind
    assert "IKE daemon restarted" not in a.log_text()  # the same daemon all along: no takeover


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_ike_daemon_restart_is_repaired(hosts, swan, side):
    a, b = hosts
    add_pair(a, b, "tun", "gre", psk="swordfish")
    a.wait_ike_up("tun")
    b.wait_ike_up("tun")
    # a (the lower address) initiates. A restarted responder must not wait for the initiator to
    # notice (its IKE SA looks fine to it until DPD gives up, minutes later).
    restarted = a if side == "initiator" else b
    conn = restarted.tunnel("tun")["conn"]
    restarted.stop_ike_daemon(hard=True)
    started = time.monotonic()
    restarted.start_ike_daemon()
    wait_for(lambda: conn in swan.conns(restarted), 30, what="connection reloaded after the daemon restarted")
    assert conn in swan.secrets(restarted)
    # The daemon's own SA list, not the monitor's status (which may not have noticed the restart yet).
    wait_for(lambda: conn in swan.ike_sa_ids(restarted), 30, what=f"a new IKE SA after the {side}'s daemon restarted")
    print(f"{swan.name} {side} restart: IKE SA up again after {time.monotonic() - started:.1f} s")
    for host in (a, b):
        host.wait_ike_up("tun", timeout=30)


def test_foreign_connection_and_secret_survive_every_reconcile(hosts, swan):
    a, b = hosts
    swan.add_foreign(a)
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    a.wait_ike_up("tun")
    a.vsctl("del-port", "tun")
    wait_for(lambda: a.tunnel("tun") is None, 10, what="tunnel removal")
    a.appctl("refresh")
    assert "myvpn-2" in swan.conns(a) and "myvpn" in swan.secrets(a)
    add_tunnel(a, b, "tun", "geneve", psk="swordfish")
    a.wait_ike_up("tun")
    a.stop_monitor(cleanup=True)  # exit with cleanup removes only what we created
    assert swan.conns(a) == {"myvpn-2"}
    assert swan.secrets(a) == {"myvpn"}


def test_exit_with_cleanup_removes_all_our_objects(hosts, swan):
    a, b = hosts
    add_pair(a, b, "tun", "vxlan", psk="swordfish")
    a.wait_ike_up("tun")
    a.stop_monitor(cleanup=True)
    assert swan.conns(a) == set() and swan.secrets(a) == set()
    wait_for(lambda: not swan.ike_sa_ids(a), 10, what="SAs terminated on exit")


@pytest.mark.parametrize("options, reason", [
    ({"psk": "swordfish", "dst_port": "²"}, "'dst_port' '²' is not a port number"),
    ({"psk": "swordfish", "ipsec_dpddelay": "30s\n"}, "option 'ipsec_dpddelay' has an invalid value '30s\\n'"),
    ({"psk": "swordfish", "remote_ip": "flow"}, "'remote_ip=flow' cannot be encrypted"),
    ({"psk": "swordfish", "remote_ip": "fd00:231::2"}, "not of the same address family"),
    ({"remote_name": "peer"}, "must set 'certificate' as local certificate"),
    ({"remote_cert": "/nonexistent.pem"}, "must set 'certificate' as local certificate"),
])
def test_bad_input_is_invalid_and_the_valid_tunnel_stays_up(hosts, swan, options, reason):
    a, b = hosts
    add_pair(a, b, "good", "gre", psk="swordfish")
    conn = a.wait_ike_up("good")["conn"]
    sa_before = swan.ike_sa_ids(a)[conn]
    conns_before = swan.conns(a)
    add_tunnel(a, b, "bad", "geneve", **options)
    assert reason in a.wait_state("bad", "invalid")["reason"]
    a.appctl("refresh")
    assert swan.ike_sa_ids(a)[conn] == sa_before
    assert swan.conns(a) == conns_before  # nothing of the bad tunnel reached the daemon
    assert a.log_text().count("event=tunnel_invalid tunnel=bad ") == 1  # logged once, not on every wake
    a.vsctl("set", "interface", "good", "options:ipsec_dpd-delay=20s")  # another change: still once
    a.wait_ike_up("good")
    assert a.log_text().count("event=tunnel_invalid tunnel=bad ") == 1


def test_parameter_change_replaces_only_that_connection(hosts, swan):
    a, b = hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    add_tunnel(a, b, "other", "gre", family=6, psk="swordfish")
    add_tunnel(b, a, "other", "gre", family=6, psk="swordfish")
    old = a.wait_ike_up("tun")["conn"]
    other = a.wait_ike_up("other")["conn"]
    other_sa = swan.ike_sa_ids(a)[other]
    for host in (a, b):
        host.vsctl("set", "interface", "tun", f"options:ipsec_ike={swan.other_ike}")
    new = wait_for(lambda: (t := a.tunnel("tun")) and t["conn"] != old and t["ike_sas"] > 0 and t, 30,
                   what="re-established with the new proposal")["conn"]
    assert old not in swan.conns(a) and new in swan.conns(a)
    assert swan.ike_sa_ids(a)[other] == other_sa


# -- LibreSwan only -----------------------------------------------------------------------------------



def our_nicknames(host) -> set[str]:
    listing = subprocess.run(["certutil", "-L", "-d", f"sql:{host.lsw_root}/nss"], capture_output=True, text=True)
    return parse.nss_nicknames(listing.stdout)


@pytest.mark.parametrize("tunnel_type", ["gre", "geneve", "vxlan"])
def test_libreswan_ca_signed_tunnel_reaches_established(lsw_hosts, tmp_path, tunnel_type):
    a, b = lsw_hosts
    make_ca_signed(tmp_path)  # ECDSA P-256, our PKI's default: pluto signs with authby ecdsa
    connect_with_certificates(a, b, tmp_path, tunnel_type, ca=True)
    assert len(our_nicknames(a)) == 2  # our certificate and key, the CA


@pytest.mark.parametrize("tunnel_type", ["gre", "geneve", "vxlan"])
def test_libreswan_self_signed_tunnel_reaches_established(lsw_hosts, tmp_path, tunnel_type):
    make_self_signed(tmp_path)
    connect_with_certificates(*lsw_hosts, tmp_path, tunnel_type, ca=False)


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
    pki(tmp_path, "init")
    for name in ("hostA", "hostB"):
        pki(tmp_path, "req", name)
        pki(tmp_path, "sign", name, "switch")
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
        [f"{conn}.conf", f"{conn}.secrets", f"{conn6}.conf", f"{conn6}.secrets"])
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


@pytest.mark.parametrize("case", ["geneve_psk", "vxlan_custom_port_forceencaps", "gre_ipv6_options",
                                  "default_crypto", "shared_peering"])
def test_libreswan_golden_configurations_load_into_real_pluto(sandbox, case):
    """Every option the renderer writes (see tests/unit/golden) is accepted by pluto 4.10 itself."""
    reason = _libreswan_missing()
    if reason:
        pytest.skip(reason)
    host = sandbox.add_host("a", "10.0.0.1/24", "fd00::1/64", ike_daemon="libreswan")
    host.start_pluto()
    text = (Path(__file__).parents[1] / "unit/golden" / f"libreswan_{case}.conf").read_text()
    names = [line.split()[1] for line in text.splitlines() if line.startswith("conn ")]
    path = host.lsw_root / "etc/ipsec.d" / "golden.conf"
    path.write_text(text)
    result = subprocess.run([f"{host.lsw_root}/usr/sbin/ipsec", "addconn", "--ctlsocket", host.pluto_ctl,
                             "--config", str(path), *names], capture_output=True, text=True, timeout=30)
    assert parse.problem(result.stdout, result.stderr, result.returncode) is None
    assert set(names) <= parse.loaded_conns(host.whack("--status"))
