"""The backend contract: the same cases against both IKE daemons (`swan` is parametrized), real
ovsdb-servers, charons and plutos in network namespaces. Whatever the daemon, the same OVSDB input
gives the same status, and only our own objects are ever touched.

On this host's kernel child SAs cannot be installed (no ESP): a tunnel gets as far as its IKE SA
(`negotiating`); the real-kernel lab proves the data path.
"""

from __future__ import annotations

import re
import time

import pytest

from testsupport.procs import wait_for
from testsupport.tunnels import add_pair, add_tunnel, connect_with_certificates, make_ca_signed, make_self_signed


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


@pytest.mark.parametrize("tunnel_type", ["gre", "geneve", "vxlan"])
@pytest.mark.parametrize("ca", [True, False], ids=["ca-signed", "self-signed"])
def test_certificate_tunnels_come_up_with_the_right_auth_and_peer(hosts, tmp_path, ca, tunnel_type):
    (make_ca_signed if ca else make_self_signed)(tmp_path)
    connect_with_certificates(*hosts, tmp_path, tunnel_type, ca=ca)


# -- hostile input (issue 12) ---------------------------------------------------------------------------

# What an attacker who can write OVSDB tried at 4dd943d, and more; each row is written verbatim.
HOSTILE_ROWS = [
    ("forge1", "vxlan", {"remote_ip": 'fe80::1%x\n10.231.0.9 10.231.0.99 : PSK "attacker"\n#', "psk": "x"}),
    ("forge2", "vxlan", {"remote_ip": "fe80::1%x\u2028conn operator-vpn", "psk": "x"}),
    ("digits", "geneve", {"remote_ip": "10.231.0.2", "dst_port": "²", "psk": "x"}),
    ("scoped", "geneve", {"local_ip": "fe80::1%eth0", "remote_ip": "fe80::2", "psk": "x"}),
    ("vx1\n", "vxlan", {"remote_ip": "10.231.0.2", "psk": "x"}),
    ("bidi\u202e", "vxlan", {"remote_ip": "10.231.0.2", "psk": "x"}),
    ("inject", "gre", {"remote_ip": "10.231.0.2", "psk": "x", "ipsec_ike": "aes256gcm16\n    leftupdown=/tmp/owned"}),
    ("kmsg", "geneve", {"remote_ip": "10.231.0.2", "remote_cert": "/proc/kmsg"}),
    ("zero", "geneve", {"remote_ip": "10.231.0.2", "remote_cert": "/dev/zero"}),
    ("updown", "geneve", {"remote_ip": "10.231.0.77", "psk": "x", "ipsec_leftupdown": "/tmp/owned",
                          "ipsec_also": "operator-vpn"}),
]


def test_hostile_rows_disturb_nothing_and_the_monitor_keeps_working(hosts, swan, tmp_path):
    a, b = hosts
    swan.add_foreign(a)
    foreign_conns, foreign_secrets = swan.conns(a), swan.secrets(a)
    # The monitor reads certificate paths as files: they must not exist for the refusal to be about them.
    a.vsctl("set", "Open_vSwitch", ".", f"other_config:certificate={tmp_path}/c.pem",
            f"other_config:private_key={tmp_path}/k.pem")
    for name, interface_type, options in HOSTILE_ROWS:
        a.ovsdb.add_raw_interface(name, interface_type, options)
    add_pair(a, b, "good", "gre", psk="swordfish")  # a valid tunnel added after the hostile rows
    assert a.wait_ike_up("good", timeout=45)["auth"] == "psk"
    status = {t["name"]: t for t in a.status()["tunnels"]}
    for name, _type, _options in HOSTILE_ROWS:
        if name != "updown":
            assert status[name]["state"] == "invalid", status[name]
    assert status["updown"]["ignored_options"] == [
        {"key": "ipsec_also", "why": "refused: would pull settings from another section"},
        {"key": "ipsec_leftupdown", "why": "refused: would run a command as root"}]
    assert foreign_conns <= swan.conns(a) and foreign_secrets <= swan.secrets(a)  # the operator's, intact
    a.appctl("refresh")
    assert "ovs-ipsec" in a.appctl("version") or a.appctl("version")
    shown = a.appctl("tunnels/show")
    assert all(line.isprintable() for line in shown.splitlines())
    log = a.log_text()
    assert "attacker" not in "".join(line for line in log.splitlines() if "PSK" in line and "forge1" not in line)
    assert all(line.isprintable() for line in log.splitlines())
    if swan.name == "libreswan":
        written = "".join(p.read_text() for p in (a.lsw_root / "etc/ipsec.d").glob("ovsipsec-*"))
        assert "attacker" not in written and "\u2028" not in written
        # The one updown command is ours (pluto's event hints), never one a row smuggled in.
        ours = f"{a.lsw_root}/etc/ipsec.d/ovsipsec-updown"
        settings = {line.strip() for line in written.splitlines() if re.match(r"\s*\w*updown\s*=", line)}
        assert settings == {f"leftupdown={ours}"}


PSKS = ['sw"ord', "back\\slash\\", "with # hash and spaces", "ünïcödé-ключ-鍵", "x" * 200]


@pytest.mark.parametrize("psk", PSKS, ids=["quote", "backslash", "hash-space", "utf8", "long"])
def test_any_psk_ovsdb_can_hold_works(hosts, swan, psk):
    a, b = hosts
    for host in (a, b):
        host.ovsdb.add_raw_interface("tun", "geneve", {"local_ip": host.address,
                                                       "remote_ip": (b if host is a else a).address, "psk": psk})
    for host in (a, b):
        assert host.wait_ike_up("tun", timeout=45)["auth"] == "psk"


# -- fail safe (issue 13) ---------------------------------------------------------------------------------

def test_a_broken_edit_keeps_the_last_good_configuration_and_its_sa(hosts, swan):
    a, b = hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    conn = a.wait_ike_up("tun")["conn"]
    sa = swan.ike_sa_ids(a)[conn]
    breakages = [  # (what an operator mistyped, how they fixed it)
        (["set", "interface", "tun", 'options:psk=""'], ["set", "interface", "tun", "options:psk=swordfish"]),
        (["set", "interface", "tun", "options:dst_port=x"], ["remove", "interface", "tun", "options", "dst_port"]),
        (["set", "interface", "tun", "options:remote_cert=/nonexistent.pem"],
         ["remove", "interface", "tun", "options", "remote_cert"]),
    ]
    for mistake, fix in breakages:
        a.vsctl(*mistake)
        tunnel = a.wait_state("tun", "invalid")
        assert tunnel["last_good_since"] and tunnel["conn"] == conn and tunnel["ike_sas"] == 1
        a.appctl("refresh")
        assert swan.ike_sa_ids(a)[conn] == sa and conn in swan.conns(a)
        a.vsctl(*fix)
    assert a.wait_ike_up("tun")["last_good_since"] is None and swan.ike_sa_ids(a)[conn] == sa
    a.vsctl("remove", "interface", "tun", "options", "psk")  # IPsec removed on purpose: now it goes
    wait_for(lambda: conn not in swan.conns(a), 20, what="the connection removed")


def test_ovns_ipsec_options_are_applied_not_refused(hosts, swan):
    """The options OVN's own test (tests/ovn-ipsec.at) puts on every tunnel through NB_Global."""
    a, b = hosts
    add_pair(a, b, "ovn-b-0", "geneve", psk="swordfish", ipsec_encapsulation="yes",
             **{"ipsec_replay-window": "100", "ipsec_dpd-delay": "30s", "ipsec_dpd-timeout": "120s",
                "ipsec_salifetime": "8h"})
    tunnel = a.wait_ike_up("ovn-b-0", timeout=45)
    assert tunnel["options"] == {"forceencaps": "yes", "dpd_delay": "30s", "dpd_timeout": "120s",
                                 "sa_lifetime": "28800s", "replay_window": "100"}
    assert [o["key"] for o in tunnel["ignored_options"]] == (["dpd_timeout"] if swan.name == "strongswan" else [])
