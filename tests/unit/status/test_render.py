"""The guard in `tunnels/show`, the status JSON and the `ovs-ipsec status` table."""

from __future__ import annotations

from dataclasses import replace

from ovs_ipsec.guard.policy import GuardStatus
from ovs_ipsec.model import GlobalConfig, SkbMark, TunnelState
from ovs_ipsec.status.render import render_show, render_table
from ovs_ipsec.status.snapshot import StatusSnapshot, TunnelStatus

ON = GuardStatus("0/1", SkbMark(0, 1), None, True, 13, 13)


def snapshot(guard: GuardStatus) -> StatusSnapshot:
    return replace(StatusSnapshot.empty(), global_config=GlobalConfig(skb_mark=guard.configured), guard=guard)


def test_json_always_has_the_guard():
    assert snapshot(GuardStatus()).as_json()["guard"] == {
        "mode": "off", "configured": None, "error": None, "in_place": True, "policies": 0, "wanted": 0,
        "uncovered": []}
    assert snapshot(ON).as_json()["guard"]["mode"] == "0/1"


def test_show_keeps_upstreams_layout_when_off_and_adds_one_line_when_on():
    assert render_show(snapshot(GuardStatus())) == "No tunnels configured with IPsec\n"
    assert render_show(snapshot(ON)) == ("No tunnels configured with IPsec\n"
                                         "Plaintext guard: 0/1, 13 XFRM policies in place\n")


def test_errors_and_missing_policies_are_shown():
    broken = GuardStatus("0/x", SkbMark(0, 1), "ipsec_skb_mark '0/x': mask 'x' is not a number", False, 12, 13)
    assert render_show(snapshot(broken)).endswith(
        "Plaintext guard: 0/1, NOT in place (12 of 13 XFRM policies); ipsec_skb_mark '0/x': mask 'x' is not a "
        "number\n")
    table = render_table(snapshot(broken).as_json(), 0.0)
    assert table.splitlines()[-1].startswith("Plaintext guard: 0/1, NOT in place")


def test_unprotected_tunnels_say_so_in_show_and_in_the_guard_line():
    tunnel = TunnelStatus(name="vx-dpdk", type="vxlan", local_ip="10.0.0.1", remote_ip="10.0.0.2", auth="psk",
                          state=TunnelState.UNPROTECTED, reason="on a bridge with datapath_type=netdev")
    guard = replace(ON, uncovered=("vx-dpdk",))
    shown = render_show(replace(snapshot(guard), tunnels=(tunnel,)))
    assert "Interface name: vx-dpdk v1 (UNPROTECTED: on a bridge with datapath_type=netdev)" in shown
    assert "cannot cover 1 tunnel(s) on the userspace datapath, which bypasses XFRM: vx-dpdk" in shown
    table = render_table(replace(snapshot(guard), tunnels=(tunnel,)).as_json(), now=0.0)
    assert "vx-dpdk" in table and "unprotected" in table and "1 unprotected" in table
