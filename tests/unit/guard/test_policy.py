"""The plaintext guard as data: exact policy sets for each mode, and the plan against the kernel."""

from __future__ import annotations

import pytest

from testsupport.builders import desired, row
from ovs_ipsec.guard.policy import (
    GUARD_PRIORITY, OWNED_PRIORITIES, GuardPolicy, InstalledPolicy, guard_policies, mark_in_force, plan_changes,
)
from ovs_ipsec.model import GlobalConfig, SkbMark
from ovs_ipsec.validate import CertificateFacts, parse_skb_mark, validate
from ovs_ipsec.validate.guard import guard_config

ZERO, ONE = SkbMark(0, 1), SkbMark(1, 1)
V4, V6 = "0.0.0.0/0", "::/0"


def tunnels(*rows):
    return validate(desired(*rows), CertificateFacts(), 0.0).tunnels


def out(family_any, protocol, port, mark):
    return GuardPolicy("out", family_any, family_any, protocol, port, mark)


def defaults(mark):
    """Outbound policies every guarded host has: GRE, VXLAN, Geneve, STT, both families."""
    return {out(any_, protocol, port, mark) for any_ in (V4, V6)
            for protocol, port in (("gre", None), ("udp", 4789), ("udp", 6081), ("tcp", 7471))}


def test_no_mark_means_no_guard():
    assert guard_policies(None, tunnels(row("t", "vxlan", remote_ip="10.0.0.2", psk="x"))) == frozenset()


def test_0_1_without_tunnels_guards_the_default_tunnel_ports():
    assert guard_policies(ZERO, ()) == defaults(ZERO)


def test_0_1_with_ipsec_tunnels_adds_their_ports_and_inbound_from_each_peer():
    found = guard_policies(ZERO, tunnels(
        row("gnv", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="x"),
        row("vx", "vxlan", local_ip="10.0.0.1", remote_ip="10.0.0.3", dst_port="7000", psk="x"),
        row("gre6", "gre", remote_ip="fd00::2", psk="x"),
        row("stt", "stt", remote_ip="10.0.0.4", psk="x"),
    ))
    assert found == defaults(ZERO) | {
        out(V4, "udp", 7000, ZERO), out(V6, "udp", 7000, ZERO),
        GuardPolicy("in", "10.0.0.2/32", V4, "udp", 6081, None),
        GuardPolicy("in", "10.0.0.3/32", V4, "udp", 7000, None),
        GuardPolicy("in", "fd00::2/128", V6, "gre", None, None),
        GuardPolicy("in", "10.0.0.4/32", V4, "tcp", 7471, None),
    }
    assert {policy.priority for policy in found} == {GUARD_PRIORITY}
    assert GUARD_PRIORITY in OWNED_PRIORITIES and OWNED_PRIORITIES.start > 600_000  # beyond charon's


def test_1_1_marks_only_outbound_inbound_is_the_same_in_every_mode():
    rows = (row("gnv", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="x"),)
    one = guard_policies(ONE, tunnels(*rows))
    zero = guard_policies(ZERO, tunnels(*rows))
    assert {p for p in one if p.direction == "out"} == defaults(ONE)
    assert {p for p in one if p.direction == "in"} == {p for p in zero if p.direction == "in"} == {
        GuardPolicy("in", "10.0.0.2/32", V4, "udp", 6081, None)}


def test_any_value_and_mask_is_the_outbound_selector_and_mask_0_selects_every_packet():
    mark = parse_skb_mark("0x100/0xff00")
    assert {p.mark for p in guard_policies(mark, ())} == {SkbMark(0x100, 0xFF00)}
    assert {p.mark for p in guard_policies(SkbMark(0, 0), ())} == {None}


def test_ports_of_non_ipsec_tunnels_are_guarded_outbound_only():
    plain = (row("plain", "vxlan", remote_ip="10.0.0.9", dst_port="9999"), row("br", "internal"),
             row("bad", "geneve", remote_ip="10.0.0.9", dst_port="x"))
    found = guard_policies(ZERO, (), guard_config(GlobalConfig(), plain).traffic)
    assert found == defaults(ZERO) | {out(V4, "udp", 9999, ZERO), out(V6, "udp", 9999, ZERO)}


def test_ike_ports_are_never_guarded_even_when_a_tunnel_claims_them():
    found = guard_policies(ZERO, tunnels(row("t", "vxlan", remote_ip="10.0.0.2", dst_port="4500", psk="x")))
    assert found == defaults(ZERO)


def test_tunnels_to_the_same_peer_and_port_share_one_inbound_policy():
    found = guard_policies(ZERO, tunnels(
        row("a", "gre", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="x"),
        row("b", "gre", local_ip="10.0.0.5", remote_ip="10.0.0.2", psk="x")))
    assert [p for p in found if p.direction == "in"] == [GuardPolicy("in", "10.0.0.2/32", V4, "gre", None, None)]


def installed(policy: GuardPolicy, index: int, **changes) -> InstalledPolicy:
    fields = dict(direction=policy.direction, src=policy.src, dst=policy.dst, protocol=policy.protocol,
                  sport=None, dport=policy.dport, mark=policy.mark, priority=policy.priority, action="block",
                  index=index)
    return InstalledPolicy(**{**fields, **changes})


CHARON_IN = InstalledPolicy("in", "10.0.0.2/32", "10.0.0.1/32", "udp", None, 6081, None, 366912, "allow", 8,
                            templates=True)


def test_plan_adds_what_is_missing_and_leaves_what_is_in_place():
    wanted = frozenset(defaults(ZERO))
    present = sorted(wanted)[:3]
    changes = plan_changes(wanted, [installed(p, i) for i, p in enumerate(present)] + [CHARON_IN])
    assert set(changes.add) == wanted - set(present)
    assert changes.replace == changes.remove == changes.blocked == ()


def test_plan_removes_only_our_policies():
    foreign_block = InstalledPolicy("out", V4, V4, "udp", None, 4789, ZERO, 5000, "block", 17)
    in_band_other_shape = InstalledPolicy("fwd", V4, V4, None, None, None, None, GUARD_PRIORITY, "allow", 42)
    ours = installed(out(V4, "udp", 4789, ONE), 25)
    changes = plan_changes(frozenset(), [foreign_block, in_band_other_shape, ours, CHARON_IN])
    assert changes.remove == (ours,)
    assert not (changes.add or changes.replace or changes.blocked)


def test_mode_change_adds_the_new_mark_and_removes_the_old():
    old = [installed(p, i) for i, p in enumerate(sorted(defaults(ZERO)))]
    changes = plan_changes(frozenset(defaults(ONE)), old)
    assert set(changes.add) == defaults(ONE) and set(changes.remove) == set(old)


def test_our_policy_in_another_shape_at_the_same_place_is_updated_in_place():
    policy = out(V4, "gre", None, ZERO)
    older = installed(policy, 3, priority=GUARD_PRIORITY + 5)
    changes = plan_changes(frozenset({policy}), [older])
    assert changes.replace == (policy,) and changes.remove == () and changes.add == ()


def test_a_foreign_policy_holding_the_place_is_reported_not_touched():
    policy = GuardPolicy("in", "10.0.0.2/32", V4, "udp", 6081, None)
    theirs = installed(policy, 9, priority=100, action="allow")
    changes = plan_changes(frozenset({policy}), [theirs])
    assert changes.blocked == ((policy, theirs),) and not (changes.add or changes.remove or changes.replace)
    assert not changes.converged


@pytest.mark.parametrize("policies, expected", [
    ([], (True, None)),
    ([installed(out(V4, "gre", None, ZERO), 1), installed(out(V6, "gre", None, ZERO), 2)], (True, ZERO)),
    ([installed(out(V4, "gre", None, None), 1)], (True, SkbMark(0, 0))),
    ([installed(out(V4, "gre", None, ZERO), 1), installed(out(V6, "gre", None, ONE), 2)], (False, None)),
    ([installed(GuardPolicy("in", "10.0.0.2/32", V4, "gre", None, None), 1)], (False, None)),
    ([CHARON_IN], (True, None)),
])
def test_mode_read_back_from_the_kernel(policies, expected):
    assert mark_in_force(policies) == expected


def test_our_policy_altered_in_place_is_put_back():
    policy = GuardPolicy("in", "10.0.0.2/32", V4, "udp", 6081, None)
    altered = installed(policy, 9, action="allow")  # `ip xfrm policy update ... action allow` by hand
    assert not altered.owned
    changes = plan_changes(frozenset({policy}), [altered])
    assert changes.replace == (policy,) and not (changes.add or changes.remove or changes.blocked)
