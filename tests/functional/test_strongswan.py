"""The core engine against real daemons: ovsdb-server, two charons in two namespaces, our monitor.

On this host's kernel CHILD_SAs cannot be installed (no ESP), so `established` means the IKE SA
is up; the real-kernel lab proves the data path.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ovs_ipsec
from tunnels import add_pair, add_tunnel, charon_conns, charon_secrets, ike_sa_ids
from ovs_ipsec.sandbox import wait_for


@pytest.mark.parametrize("tunnel_type", ["gre", "geneve", "vxlan"])
def test_psk_tunnel_reaches_established_on_both_sides(two_hosts, tunnel_type):
    a, b = two_hosts
    add_pair(a, b, "tun", tunnel_type, psk="swordfish")
    for host in (a, b):
        tunnel = host.wait_state("tun", "established")
        assert tunnel["ike_sas"] == 1 and tunnel["auth"] == "psk" and tunnel["reason"] is None
    assert a.tunnel("tun")["initiator"] != b.tunnel("tun")["initiator"]


def test_ipv6_underlay_tunnel_reaches_established(two_hosts):
    a, b = two_hosts
    add_tunnel(a, b, "tun6", "geneve", family=6, psk="swordfish")
    add_tunnel(b, a, "tun6", "geneve", family=6, psk="swordfish")
    assert a.wait_state("tun6", "established")["remote_ip"] == "fd00:231::2"


def test_custom_dst_port_gets_selectors_on_that_port(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "vx", "vxlan", psk="swordfish", dst_port="7000")
    conn = a.wait_state("vx", "established")["conn"]
    (listed,) = [c for event in a.vici().list_conns({"ike": conn}) for c in event.values()]
    selectors = {name.split("-")[1]: (child["local-ts"], child["remote-ts"])
                 for name, child in listed["children"].items()}
    port = _port_label(7000, "udp").encode()  # charon prints a port by its /etc/services name
    assert selectors == {"out": ([b"dynamic[udp]"], [b"dynamic[udp/" + port + b"]"]),
                         "in": ([b"dynamic[udp/" + port + b"]"], [b"dynamic[udp]"])}


def test_deleting_the_last_tunnel_to_a_peer_removes_its_connection_secret_and_sa(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    add_tunnel(a, b, "keep", "gre", family=6, psk="other")  # another peer (over IPv6): must not be touched
    add_tunnel(b, a, "keep", "gre", family=6, psk="other")
    conn = a.wait_state("tun", "established")["conn"]
    kept = a.wait_state("keep", "established")["conn"]
    kept_sa = ike_sa_ids(a)[kept]
    a.vsctl("del-port", "tun")
    wait_for(lambda: conn not in charon_conns(a), 10, what="connection removal")
    assert conn not in charon_secrets(a)
    wait_for(lambda: conn not in ike_sa_ids(a), 10, what="IKE SA termination")
    assert a.tunnel("tun") is None
    assert ike_sa_ids(a)[kept] == kept_sa


def test_tunnels_to_the_same_peer_share_one_ike_sa_and_leave_it_one_by_one(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "gnv", "geneve", psk="swordfish")
    conn = a.wait_state("gnv", "established")["conn"]
    sa = ike_sa_ids(a)[conn]
    add_pair(a, b, "gre", "gre", psk="swordfish")
    assert a.wait_state("gre", "established")["conn"] == conn
    b.wait_state("gre", "established")
    assert ike_sa_ids(a)[conn] == sa  # adding a tunnel did not re-key the peering
    children = {c for event in a.vici().list_conns({"ike": conn}) for c in event[conn]["children"]}
    assert {c.split("-")[0] for c in children} == {"gnv", "gre"}
    a.vsctl("del-port", "gnv")
    wait_for(lambda: a.tunnel("gnv") is None, 10, what="gnv removed from status")
    wait_for(lambda: all(c.startswith("gre-") for event in a.vici().list_conns({"ike": conn})
                         for c in event[conn]["children"]), 10, what="gnv's children removed")
    assert ike_sa_ids(a)[conn] == sa
    assert a.tunnel("gre")["state"] == "established"


def test_tunnels_to_the_same_peer_with_different_psks_are_rejected(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "first", "geneve", psk="swordfish")
    a.wait_state("first", "established")
    add_tunnel(a, b, "second", "gre", psk="another")
    assert "its 'psk' differs from tunnel 'first'" in a.wait_state("second", "invalid")["reason"]


def test_monitor_restart_without_change_touches_nothing_in_charon(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    a.wait_state("tun", "established")
    before = (ike_sa_ids(a), charon_conns(a), charon_secrets(a))
    log_before = len(a.log_text())
    a.stop_monitor(cleanup=False)
    assert ike_sa_ids(a) == before[0]  # --no-cleanup leaves everything up
    a.start_monitor()
    a.wait_state("tun", "established")
    a.appctl("refresh")
    assert (ike_sa_ids(a), charon_conns(a), charon_secrets(a)) == before
    assert "LoadConn" not in a.log_text()[log_before:]  # the pass summary names every action kind


def test_charon_restart_is_repaired(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "gre", psk="swordfish")
    conn = a.wait_state("tun", "established")["conn"]
    a.stop_charon(hard=True)
    a.start_charon()
    wait_for(lambda: conn in charon_conns(a), 30, what="connection reloaded after charon restart")
    assert conn in charon_secrets(a)  # a PSK peering's secret carries the connection's name
    a.wait_state("tun", "established", timeout=60)
    b.wait_state("tun", "established", timeout=60)


def test_foreign_connection_and_secret_survive_every_reconcile(two_hosts):
    a, b = two_hosts
    session = a.vici()
    session.load_conn({"myvpn-2": {"remote_addrs": ["10.231.0.99"], "local": {"auth": "psk"},
                                   "remote": {"auth": "psk"}, "children": {"net": {}}}})
    session.load_shared({"id": "myvpn", "type": "IKE", "data": "foreign", "owners": ["10.231.0.99"]})
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    a.wait_state("tun", "established")
    a.vsctl("del-port", "tun")
    wait_for(lambda: a.tunnel("tun") is None, 10, what="tunnel removal")
    a.appctl("refresh")
    assert "myvpn-2" in charon_conns(a) and "myvpn" in charon_secrets(a)
    add_tunnel(a, b, "tun", "geneve", psk="swordfish")
    a.wait_state("tun", "established")
    a.stop_monitor(cleanup=True)  # exit with cleanup removes only what we created
    assert charon_conns(a) == {"myvpn-2"}
    assert charon_secrets(a) == {"myvpn"}


def test_exit_with_cleanup_removes_all_our_objects(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "vxlan", psk="swordfish")
    a.wait_state("tun", "established")
    a.stop_monitor(cleanup=True)
    assert charon_conns(a) == set() and charon_secrets(a) == set()
    wait_for(lambda: not ike_sa_ids(a), 10, what="SAs terminated on exit")


@pytest.mark.parametrize("options, reason", [
    ({"psk": 'sw"ord\nfish'}, "'psk' contains a double quote or a control character"),
    ({"psk": "swordfish", "ipsec_leftupdown": "/tmp/x"}, "option 'ipsec_leftupdown' is not supported"),
    ({"psk": "swordfish", "remote_ip": "flow"}, "'remote_ip=flow' cannot be encrypted"),
    ({"psk": "swordfish", "remote_ip": "fd00:231::2"}, "not of the same address family"),
    ({"remote_name": "peer"}, "must set 'certificate' as local certificate"),
    ({"remote_cert": "/nonexistent.pem"}, "must set 'certificate' as local certificate"),
])
def test_bad_input_is_invalid_and_the_valid_tunnel_stays_up(two_hosts, options, reason):
    a, b = two_hosts
    add_pair(a, b, "good", "gre", psk="swordfish")
    conn = a.wait_state("good", "established")["conn"]
    sa_before = ike_sa_ids(a)[conn]
    conns_before = charon_conns(a)
    add_tunnel(a, b, "bad", "geneve", **options)
    bad = a.wait_state("bad", "invalid")
    assert reason in bad["reason"]
    a.appctl("refresh")
    assert ike_sa_ids(a)[conn] == sa_before
    assert charon_conns(a) == conns_before  # nothing of the bad tunnel reached charon
    assert a.log_text().count("event=tunnel_invalid tunnel=bad ") == 1  # logged once, not on every wake
    a.vsctl("set", "interface", "good", "options:ipsec_dpd-delay=20s")  # another change: still once
    a.wait_state("good", "established")
    assert a.log_text().count("event=tunnel_invalid tunnel=bad ") == 1


def test_parameter_change_replaces_only_that_connection(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    add_tunnel(a, b, "other", "gre", family=6, psk="swordfish")
    add_tunnel(b, a, "other", "gre", family=6, psk="swordfish")
    old = a.wait_state("tun", "established")["conn"]
    other = a.wait_state("other", "established")["conn"]
    other_sa = ike_sa_ids(a)[other]
    for host in (a, b):
        host.vsctl("set", "interface", "tun", "options:ipsec_ike=aes128gcm16-prfsha256-ecp256")
    new = wait_for(lambda: (t := a.tunnel("tun")) and t["conn"] != old and t["state"] == "established" and t, 30,
                   what="re-established with the new proposal")["conn"]
    assert old not in charon_conns(a) and new in charon_conns(a)
    assert ike_sa_ids(a)[other] == other_sa


def test_secrets_never_reach_status_or_logs(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "geneve", psk="Sup3rS3cretPSK")
    a.wait_state("tun", "established")
    shown = a.appctl("tunnels/show") + a.appctl("tunnels/show", "--json") + a.appctl("ipsec/status")
    assert "Sup3rS3cretPSK" not in shown
    assert "PSK:            <hidden>" in shown
    assert "Sup3rS3cretPSK" not in a.log_text()


def test_status_command_prints_table_and_json(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    a.wait_state("tun", "established")
    cli = [sys.executable, "-m", "ovs_ipsec.cli.main", "status", f"--unixctl={a.unixctl}"]
    table = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split()[:6] == ["TUNNEL", "TYPE", "STATE", "PEER", "AUTH", "SAS"]
    assert "tun" in table and "established" in table
    data = json.loads(subprocess.run(cli + ["--json"], capture_output=True, text=True, check=True).stdout)
    (tunnel,) = data["tunnels"]
    assert {"name", "type", "local_ip", "remote_ip", "auth", "state", "reason", "ike_sas", "child_sas"} <= tunnel.keys()


def test_unknown_exit_argument_is_an_error_not_an_exit(two_hosts):
    a, _ = two_hosts
    result = subprocess.run(["ovs-appctl", "-t", a.unixctl, "exit", "--bogus"], capture_output=True, text=True)
    assert result.returncode != 0 and "unrecognized parameter" in result.stderr
    assert a.status() is not None  # still running


def _port_label(port: int, protocol: str) -> str:
    try:
        return socket.getservbyport(port, protocol)
    except OSError:
        return str(port)


def test_drop_in_invocation_and_ovs_appctl_by_program_name(sandbox):
    """Upstream's command line and `ovs-appctl -t ovs-monitor-ipsec` (found through the pidfile)."""
    a = sandbox.add_host("a", "10.231.0.1/24")
    b = sandbox.add_host("b", "10.231.0.2/24")
    for host in (a, b):
        host.start_ovsdb()
        host.start_charon()
    b.start_monitor()
    monitor = [str(Path(sys.executable).parent / "ovs-monitor-ipsec"), "--pidfile", "--detach", "--no-chdir",
               "--log-file", "--ike-daemon=strongswan", "--no-restart-ike-daemon",
               f"--root-prefix={a.workdir}/root", f"--vici-uri=unix://{a.vici_path}", a.db]
    subprocess.run(a.netns(*monitor), env=a.env, check=True, timeout=60)
    try:
        add_pair(a, b, "tun", "geneve", psk="swordfish")
        appctl = ["ovs-appctl", "-t", "ovs-monitor-ipsec"]
        shown = wait_for(lambda: "State:          established" in (out := subprocess.run(
            appctl + ["tunnels/show"], env=a.env, capture_output=True, text=True).stdout) and out, 20,
            what="tunnels/show through the program name")
        assert "Interface name: tun v1 (CONFIGURED)" in shown
        assert (a.workdir / "ovs-monitor-ipsec.log").exists()
        version = subprocess.run(appctl + ["version"], env=a.env, capture_output=True, text=True).stdout
        assert ovs_ipsec.__version__ in version
    finally:
        subprocess.run(["ovs-appctl", "-t", "ovs-monitor-ipsec", "exit", "--no-cleanup"], env=a.env, timeout=30)


def test_ovsdb_server_restart_changes_nothing_in_charon(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    conn = a.wait_state("tun", "established")["conn"]
    sa = ike_sa_ids(a)[conn]
    a.stop_ovsdb()
    a.start_ovsdb()  # same database file: the monitor's IDL reconnects and re-reads everything
    add_tunnel(a, b, "after", "gre", family=6, psk="swordfish")  # seen only once it has re-read
    add_tunnel(b, a, "after", "gre", family=6, psk="swordfish")
    a.wait_state("after", "established", timeout=60)
    assert a.tunnel("tun")["state"] == "established"
    assert ike_sa_ids(a)[conn] == sa
