"""The core engine against real daemons: ovsdb-server, two charons in two namespaces, our monitor.

The cases every IKE daemon must pass (establish, delete, share a peering, restarts, foreign
objects, cleanup, bad input, parameter changes) run against charon and pluto alike in
test_libreswan.py; this file holds what is specific to strongSwan or to the monitor's surface.
On this host's kernel CHILD_SAs cannot be installed (no ESP), so `established` means the IKE SA
is up; the real-kernel lab proves the data path.
"""

from __future__ import annotations

import json
import socket
import os
import subprocess
import sys
import time
from pathlib import Path

import ovs_ipsec
from testsupport.tunnels import add_pair, add_tunnel, charon_conns, charon_secrets, ike_sa_ids
from testsupport.procs import wait_for


def test_ipv6_underlay_tunnel_reaches_established(two_hosts):
    a, b = two_hosts
    add_tunnel(a, b, "tun6", "geneve", family=6, psk="swordfish")
    add_tunnel(b, a, "tun6", "geneve", family=6, psk="swordfish")
    assert a.wait_ike_up("tun6")["remote_ip"] == "fd00:231::2"


def test_two_of_ours_agree_on_curve25519_and_modp2048_stays_on_offer(two_hosts):
    """The default proposals put curve25519 first: two hosts of ours negotiate it. MODP-2048 stays
    in them for upstream peers (test_mixed_cluster.py), and a tunnel configured with upstream's
    MODP-2048-only proposal still meets a default one."""
    a, b = two_hosts
    add_tunnel(a, b, "tun", "geneve", psk="swordfish")
    add_tunnel(b, a, "tun", "geneve", psk="swordfish")
    conn = a.wait_ike_up("tun")["conn"]
    assert _dh_groups(a, conn) == {b"CURVE_25519"} and _dh_groups(b, b.wait_ike_up("tun")["conn"]) == {b"CURVE_25519"}
    legacy = {"ipsec_ike": "aes256gcm16-sha256-modp2048", "ipsec_esp": "aes256gcm16-modp2048"}
    add_tunnel(a, b, "old", "geneve", family=6, psk="fish", **legacy)  # a: upstream's proposals only
    add_tunnel(b, a, "old", "geneve", family=6, psk="fish")  # b: the default
    assert _dh_groups(a, a.wait_ike_up("old")["conn"]) == {b"MODP_2048"}


def test_upgrading_from_modp2048_only_defaults_replaces_each_connection_once(two_hosts):
    """What an upgrade to the curve25519-first defaults does to live SAs. Upstream's proposals,
    pinned with ipsec_ike/ipsec_esp, render exactly the names and messages the MODP-2048-only
    defaults did (unit-tested in test_render.py), so this is the upgrade: monitors stopped without
    cleanup, the pin gone, monitors started. The old connection, its secret and its IKE SA are
    removed, the new one is loaded and negotiated (curve25519): one renegotiation per peering."""
    a, b = two_hosts
    legacy = {"ipsec_ike": "aes256gcm16-sha256-modp2048", "ipsec_esp": "aes256gcm16-modp2048"}
    add_pair(a, b, "tun", "geneve", psk="swordfish", **legacy)
    old = a.wait_ike_up("tun")["conn"]
    old_sas = ike_sa_ids(a)
    assert _dh_groups(a, old) == {b"MODP_2048"}
    for host in (a, b):
        host.stop_monitor(cleanup=False)
        host.vsctl("remove", "interface", "tun", "options", "ipsec_ike", "ipsec_esp")
    assert ike_sa_ids(a) == old_sas  # nothing moved while the monitors were down
    with PolicyEvents(a) as events:
        for host in (a, b):
            host.start_monitor()
        wait_for(lambda: len(ids := ike_sa_ids(a)) == 1 and old not in ids, 30,
                 what="the old IKE SA gone and the new connection's up, alone")
    (new,) = ike_sa_ids(a)
    assert a.wait_ike_up("tun")["conn"] == new and _dh_groups(a, new) == {b"CURVE_25519"}
    assert old not in charon_conns(a) and old not in charon_secrets(a)
    # make before break: the replacement was loaded first, so its trap policies never went away
    assert events.deleted() == []


def test_a_parameter_change_never_leaves_the_tunnel_without_its_trap_policies(two_hosts):
    """A new IKE proposal is a new connection. It is loaded before the old one is removed, and charon
    counts the users of identical policies: the kernel sees the trap policies updated, never deleted
    (removed first, the tunnel had no policy until its replacement was in: plaintext could leave).
    A change to the children alone (ESP proposal, ports) keeps the connection: charon would replace
    its children old traps first, so the old and new children are loaded together first, then the
    new ones alone."""
    a, b = two_hosts
    add_tunnel(a, b, "tun", "geneve", psk="swordfish")
    wait_for(lambda: len(charon_conns(a)) == 1, 15, what="the connection loaded")
    (old,) = charon_conns(a)
    wait_for(lambda: len(PolicyEvents.spd(a)) >= 2, 15, what="its trap policies installed")
    with PolicyEvents(a) as events:
        a.vsctl("set", "interface", "tun", "options:ipsec_ike=aes128gcm16-sha256-curve25519")
        wait_for(lambda: (conns := charon_conns(a)) and old not in conns, 15, what="the connection replaced")
    assert events.deleted() == []
    assert len(PolicyEvents.spd(a)) >= 2
    (conn,) = charon_conns(a)
    before = _children(a, conn)
    with PolicyEvents(a) as events:  # new ESP proposals: the same connection, new children
        a.vsctl("set", "interface", "tun", "options:ipsec_esp=aes128gcm16-curve25519")
        wait_for(lambda: (now := _children(a, conn)) and not now & before, 15, what="the children replaced")
    assert charon_conns(a) == {conn}
    assert events.deleted() == []
    assert len(PolicyEvents.spd(a)) >= 2


def _children(host, conn: str) -> set[str]:
    return {child.decode() if isinstance(child, bytes) else child for event in host.vici().list_conns({"ike": conn})
            for child in event[conn]["children"]}


class PolicyEvents:
    """`ip xfrm monitor policy` in the host's namespace while the block runs: the kernel's own word
    on every policy added, updated or deleted."""

    def __init__(self, host) -> None:
        self._host = host
        self._lines: list[str] = []

    def __enter__(self) -> PolicyEvents:
        self._proc = subprocess.Popen(["ip", "-n", self._host.name, "xfrm", "monitor", "policy"],
                                      stdout=subprocess.PIPE, text=True)
        time.sleep(0.2)  # subscribed before anything changes
        return self

    def __exit__(self, *_exc) -> None:
        time.sleep(0.2)
        self._proc.terminate()
        self._lines = self._proc.communicate(timeout=10)[0].splitlines()

    def deleted(self) -> list[str]:
        return [line for line in self._lines if line.startswith("Deleted")]

    @staticmethod
    def spd(host) -> list[str]:
        """The OUT policies now (the trap policies of the tunnel's children)."""
        out = subprocess.run(["ip", "-n", host.name, "xfrm", "policy", "list", "dir", "out"], capture_output=True,
                             text=True, check=True).stdout
        return [line for line in out.splitlines() if line.startswith("src ")]


def _dh_groups(host, conn: str) -> set[bytes]:
    return {sa["dh-group"] for event in host.vici().list_sas({"ike": conn}) for sa in event.values()
            if sa["state"] == b"ESTABLISHED"}


def test_custom_dst_port_gets_selectors_on_that_port(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "vx", "vxlan", psk="swordfish", dst_port="7000")
    conn = a.wait_ike_up("vx")["conn"]
    (listed,) = [c for event in a.vici().list_conns({"ike": conn}) for c in event.values()]
    selectors = {name.split("-")[1]: (child["local-ts"], child["remote-ts"])
                 for name, child in listed["children"].items()}
    port = _port_label(7000, "udp").encode()  # charon prints a port by its /etc/services name
    assert selectors == {"out": ([b"dynamic[udp]"], [b"dynamic[udp/" + port + b"]"]),
                         "in": ([b"dynamic[udp/" + port + b"]"], [b"dynamic[udp]"])}


def test_tunnels_to_the_same_peer_with_different_psks_are_rejected(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "first", "geneve", psk="swordfish")
    a.wait_ike_up("first")
    add_tunnel(a, b, "second", "gre", psk="another")
    assert "its 'psk' differs from tunnel 'first'" in a.wait_state("second", "invalid")["reason"]


def test_secrets_never_reach_status_or_logs(two_hosts):
    a, b = two_hosts
    # Every module at debug, python-ovs's jsonrpc included, which would dump each OVSDB update.
    a.appctl("vlog/set", "file:dbg")
    a.appctl("vlog/set", "jsonrpc:file:dbg")
    add_pair(a, b, "tun", "geneve", psk="Sup3rS3cretPSK")
    a.wait_ike_up("tun")
    shown = a.appctl("tunnels/show") + a.appctl("tunnels/show", "--json") + a.appctl("ipsec/status")
    assert "Sup3rS3cretPSK" not in shown
    assert "PSK:            <hidden>" in shown
    assert "Sup3rS3cretPSK" not in a.log_text()
    # vlog/set reached our own loggers too (they follow vlog's levels so as not to build dropped lines)
    assert "tunnel tun: loaded the pre-shared key" in a.log_text()


def test_status_command_prints_table_and_json(two_hosts):
    a, b = two_hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    a.wait_ike_up("tun")
    cli = [sys.executable, "-m", "ovs_ipsec.cli.main", "status", f"--unixctl={a.unixctl}"]
    table = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split()[:6] == ["TUNNEL", "TYPE", "STATE", "PEER", "AUTH", "SAS"]
    assert "tun" in table and "negotiating" in table
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
        shown = wait_for(lambda: "State:          negotiating" in (out := subprocess.run(
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
    conn = a.wait_ike_up("tun")["conn"]
    sa = ike_sa_ids(a)[conn]
    a.stop_ovsdb()
    a.start_ovsdb()  # same database file: the monitor's IDL reconnects and re-reads everything
    add_tunnel(a, b, "after", "gre", family=6, psk="swordfish")  # seen only once it has re-read
    add_tunnel(b, a, "after", "gre", family=6, psk="swordfish")
    a.wait_ike_up("after", timeout=60)
    assert a.tunnel("tun")["ike_sas"] > 0
    assert ike_sa_ids(a)[conn] == sa


def test_the_control_socket_is_private_whatever_the_umask(sandbox):
    """Anyone who can connect can call `exit`, which removes every tunnel's encryption."""
    import stat

    a = sandbox.add_host("a", "10.231.0.1/24")
    a.start_ovsdb()
    a.start_charon()
    previous = os.umask(0)
    try:
        a.start_monitor()
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(a.unixctl).st_mode)
    assert mode & 0o077 == 0, oct(mode)
