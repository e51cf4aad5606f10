"""A tunnel with IPsec options on a userspace-datapath (netdev) bridge is never reported protected.

Real ovsdb-server, ovs-vswitchd on the netdev datapath, charon and our monitor in network
namespaces. The capture shows why: OVS's userspace datapath pushes the tunnel header and sends the
frame out of br-phy's port itself, below the kernel's IP stack, so an IPsec policy for that flow
never sees it: the overlay ping crosses in plaintext VXLAN whatever IKE negotiates.
"""

from __future__ import annotations

import json

from testsupport.netdev import Capture, NetdevHost
from testsupport.procs import wait_for
from testsupport.tunnels import charon_conns

UNDERLAY = ("10.243.0.1", "10.243.0.2")
KERNEL_PEER = "10.243.0.3"   # a kernel-datapath tunnel next to it, loaded as usual


def external_ids(host: NetdevHost, name: str) -> dict[str, str]:
    reply = json.loads(host.vsctl("--format=json", "--columns=external_ids", "find", "Interface", f"name={name}"))
    return dict(reply["data"][0][0][1])


def test_ipsec_options_on_a_netdev_tunnel_are_reported_unprotected_and_the_wire_shows_why(sandbox):
    a = NetdevHost(sandbox.add_host("a", f"{UNDERLAY[0]}/24"))
    b = NetdevHost(sandbox.add_host("b", f"{UNDERLAY[1]}/24"))
    try:
        for host, peer in ((a, UNDERLAY[1]), (b, UNDERLAY[0])):
            host.start_ovs()
            host.setup_plain_underlay([peer])
            host.add_overlay_bridge("br-vx", f"10.244.0.{1 if host is a else 2}/24")
        capture = Capture(b, sandbox.workdir / "underlay.pcap")
        a.host.vsctl("set", "Open_vSwitch", ".", "other_config:ipsec_skb_mark=0/1")
        a.add_tunnel("br-vx", "vx-dpdk", "vxlan", UNDERLAY[0], UNDERLAY[1], psk="swordfish")
        b.add_tunnel("br-vx", "vx-dpdk", "vxlan", UNDERLAY[1], UNDERLAY[0])
        # The kernel's datapath (Bridge datapath_type ""): the monitor reads only OVSDB for it.
        a.vsctl("add-br", "br-k", "--", "add-port", "br-k", "vx-k", "--", "set", "interface", "vx-k",
                "type=vxlan", f"options:local_ip={UNDERLAY[0]}", f"options:remote_ip={KERNEL_PEER}",
                "options:psk=swordfish")
        a.host.start_ike_daemon()
        a.host.start_monitor()

        status = a.host.wait_state("vx-dpdk", "unprotected")
        assert "datapath_type=netdev" in status["reason"] and "userspace-esp" in status["reason"]
        assert a.host.wait_state("vx-k", "loaded")
        conns = charon_conns(a.host)
        assert len(conns) == 1 and any(KERNEL_PEER in conn for conn in conns)   # vx-k's only
        show = a.host.appctl("tunnels/show")
        assert "Interface name: vx-dpdk v1 (UNPROTECTED:" in show
        assert "cannot cover 1 tunnel(s) on the userspace datapath, which bypasses XFRM: vx-dpdk" in show
        assert a.host.status()["guard"]["uncovered"] == ["vx-dpdk"]
        wait_for(lambda: external_ids(a, "vx-dpdk").get("ipsec_state") == "unprotected", 10,
                 what="ipsec_state=unprotected in OVSDB")

        wait_for(lambda: a.ping("10.244.0.2", count=1, timeout=1)[1], 15,
                 what="the overlay ping (ARP and OVS's tunnel neighbour first)")
        sent, received, out = a.ping("10.244.0.2", count=3)
        capture.stop()
        assert (sent, received) == (3, 3), out
        # Why: the overlay crossed as plaintext VXLAN, and not one ESP packet exists.
        assert capture.count("udp port 4789") >= 6 and capture.count("ip proto 50") == 0

        # The log warns once, not every pass.
        a.host.appctl("refresh")
        a.host.wait_state("vx-dpdk", "unprotected")
        assert a.host.log_text().count("tunnel_unprotected") == 1

        # Back on the kernel's datapath, the same row is an ordinary IPsec tunnel again.
        a.vsctl("set", "bridge", "br-vx", "datapath_type=system")
        assert a.host.wait_state("vx-dpdk", "loaded", timeout=30)
    finally:
        for host in (a, b):
            host.stop()
