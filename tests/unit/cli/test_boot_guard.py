"""cli/boot_guard.py: which boot holds a configuration asks for, and which kernel policies are holds."""

from __future__ import annotations

from ovs_ipsec.cli.boot_guard import HOLD_PRIORITY, hold_policies, installed_holds, validated_state
from ovs_ipsec.guard.policy import OWNED_PRIORITIES, GuardChanges
from ovs_ipsec.guard.xfrm import batch_commands, parse_policies
from testsupport.builders import desired, row


def test_one_outbound_hold_per_ipsec_tunnel_peer_and_port():
    state = desired(row("gnv0", "geneve", remote_ip="10.0.0.2", psk="x"),
                    row("gnv7", "geneve", remote_ip="10.0.0.3", psk="x", dst_port="7000"),
                    row("gre6", "gre", remote_ip="fd00::2", psk="x"),
                    row("plain", "vxlan", remote_ip="10.0.0.4"))          # not IPsec: never held
    holds = sorted(hold_policies(validated_state(state).tunnels))
    assert [(h.direction, h.src, h.dst, h.protocol, h.dport, h.mark) for h in holds] == [
        ("out", "0.0.0.0/0", "10.0.0.2/32", "udp", 6081, None),
        ("out", "0.0.0.0/0", "10.0.0.3/32", "udp", 7000, None),
        ("out", "::/0", "fd00::2/128", "gre", None, None),
    ]
    # Outside the guard's band: the monitor's guard never takes a hold for one of its own.
    assert all(h.priority == HOLD_PRIORITY and h.priority not in OWNED_PRIORITIES for h in holds)
    assert batch_commands(GuardChanges(add=tuple(holds[:1])), ()) == [
        "xfrm policy add src 0.0.0.0/0 dst 10.0.0.2/32 proto 17 dport 6081 dir out action block "
        f"priority {HOLD_PRIORITY}"]


LISTING = f"""\
src 0.0.0.0/0 dst 10.0.0.2/32 proto udp dport 6081
\tdir out action block index 9 priority {HOLD_PRIORITY} ptype main share any flag  (0x00000000)
src 10.0.0.1/32 dst 10.0.0.2/32 proto udp dport 6081
\tdir out priority 366912 ptype main share any flag  (0x00000000)
\ttmpl src 0.0.0.0 dst 0.0.0.0
\t\tproto esp reqid 1 mode transport
src 0.0.0.0/0 dst 10.0.0.9/32 proto udp dport 6081
\tdir out action allow index 17 priority {HOLD_PRIORITY} ptype main share any flag  (0x00000000)
"""


def test_only_block_policies_of_a_holds_shape_and_priority_are_holds():
    holds = installed_holds(parse_policies(LISTING))
    assert [(h.dst, h.index) for h in holds] == [("10.0.0.2/32", 9)]
    assert batch_commands(GuardChanges(remove=holds), parse_policies(LISTING)) == [
        "xfrm policy delete dir out index 9"]
