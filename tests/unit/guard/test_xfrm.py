"""`ip xfrm policy` text <-> values, and the installer's commands (captured iproute2 6.1 output)."""

from __future__ import annotations

from ovs_ipsec.errors import CommandError
from ovs_ipsec.guard.policy import GUARD_PRIORITY, GuardChanges, GuardPolicy, InstalledPolicy, plan_changes
from ovs_ipsec.guard.xfrm import XfrmPolicyInstaller, batch_commands, parse_policies
from ovs_ipsec.model import SkbMark
from ovs_ipsec.runner import Completed

# `ip -s xfrm policy list` on this host (iproute2 6.1, kernel 6.18): charon's trap policies, ours,
# a socket policy and foreign policies of other shapes (lifetime lines trimmed but for one).
LISTING = """\
src 10.1.0.0/16 dst 10.2.0.0/16 proto icmp type 8 code 0 uid 0
\tdir out action block index 57 priority 5 ptype main share any flag  (0x00000000)
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 0(sec), hard 0(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  0(bytes), 0(packets)
\t  add 2026-11-22 08:46:20 use -
src 10.1.0.0/16 dst 10.2.0.0/16 uid 0
\tdir in action allow index 48 priority 100 ptype main share any flag  (0x00000000)
\tif_id 0x7
src 10.1.0.0/16 dst 10.2.0.0/16 dev lo uid 0
\tdir fwd action allow index 42 priority 257867780 ptype main share any flag  (0x00000000)
src fd00:231::2/128 dst ::/0 proto tcp dport 7471 uid 0
\tdir in action block index 32 priority 257867777 ptype main share any flag  (0x00000000)
src ::/0 dst ::/0 proto udp dport 4789 uid 0
\tdir out action block index 25 priority 257867777 ptype main share any flag  (0x00000000)
\tmark 0x1/0x1 
src 0.0.0.0/0 dst 0.0.0.0/0 proto gre uid 0
\tdir out action block index 17 priority 257867777 ptype main share any flag  (0x00000000)
\tmark 0/0x1 
src 10.231.0.2/32 dst 10.231.0.1/32 proto udp sport 7000 uid 0
\tdir in action allow index 8 priority 366912 ptype main share any flag  (0x00000000)
\ttmpl src 0.0.0.0 dst 0.0.0.0
\t\tproto esp spi 0x00000000(0) reqid 1(0x00000001) mode transport
\t\tlevel required share any 
\t\tenc-mask ffffffff auth-mask ffffffff comp-mask ffffffff
src 10.231.0.1/32 dst 10.231.0.2/32 proto 47 uid 0
\tdir out action allow index 1 priority 366976 ptype main share any flag  (0x00000000)
\ttmpl src 0.0.0.0 dst 0.0.0.0
\t\tproto esp spi 0x00000000(0) reqid 3(0x00000003) mode transport
src 0.0.0.0/0 dst 0.0.0.0/0 uid 0
\tsocket in action allow index 2267 priority 0 ptype main share any flag  (0x00000000)
"""

ZERO, ONE = SkbMark(0, 1), SkbMark(1, 1)


def test_parse_reads_every_policy_and_recognises_only_ours():
    policies = parse_policies(LISTING)
    assert len(policies) == 9
    ours = [p for p in policies if p.owned]
    assert ours == [
        InstalledPolicy("in", "fd00:231::2/128", "::/0", "tcp", None, 7471, None, GUARD_PRIORITY, "block", 32),
        InstalledPolicy("out", "::/0", "::/0", "udp", None, 4789, ONE, GUARD_PRIORITY, "block", 25),
        InstalledPolicy("out", "0.0.0.0/0", "0.0.0.0/0", "gre", None, None, ZERO, GUARD_PRIORITY, "block", 17),
    ]
    by_index = {p.index: p for p in policies}
    assert by_index[8] == InstalledPolicy("in", "10.231.0.2/32", "10.231.0.1/32", "udp", 7000, None, None,
                                          366912, "allow", 8, templates=True)
    assert by_index[1].protocol == "gre" and by_index[1].templates  # numbers become names
    assert by_index[48].other and by_index[42].other  # if_id, dev: never ours, even in our band
    assert by_index[2267].direction == "socket-in"


def test_parse_ignores_what_it_cannot_read():
    assert parse_policies("") == ()
    assert parse_policies("garbage line\n\tmore garbage\nsrc x dst y\n\tdir out priority 1\n") == ()


def guard(direction, src, dst, protocol, port, mark):
    return GuardPolicy(direction, src, dst, protocol, port, mark)


def test_additions_come_before_removals():
    installed = parse_policies(LISTING)
    wanted = frozenset({guard("out", "0.0.0.0/0", "0.0.0.0/0", "gre", None, ONE),
                        guard("in", "10.0.0.2/32", "0.0.0.0/0", "udp", 6081, None)})
    lines = batch_commands(plan_changes(wanted, installed), installed)
    assert lines == [
        "xfrm policy add src 10.0.0.2/32 dst 0.0.0.0/0 proto 17 dport 6081 dir in action block priority 257867777",
        "xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 proto 47 dir out mark 0x1 mask 0x1 action block "
        "priority 257867777",
        # one by one: a deleteall by priority would take the new policies with it
        "xfrm policy deleteall dir out index 17 priority 257867777",
        "xfrm policy delete dir out index 25 mark 0x1 mask 0x1",
        "xfrm policy delete dir in index 32",
    ]


def test_removing_the_whole_guard_is_one_filtered_deleteall():
    installed = parse_policies(LISTING)
    assert batch_commands(plan_changes(frozenset(), installed), installed) == [
        "xfrm policy deleteall priority 257867777"]


def test_single_removals_by_index_and_zero_marks_through_deleteall():
    installed = parse_policies(LISTING)
    keep = frozenset({guard("in", "fd00:231::2/128", "::/0", "tcp", 7471, None)})
    lines = batch_commands(plan_changes(keep, installed), installed)
    assert lines == [
        # iproute2 drops a zero mark value from `delete`, so the kernel would find nothing
        "xfrm policy deleteall dir out index 17 priority 257867777",
        "xfrm policy delete dir out index 25 mark 0x1 mask 0x1",
    ]


def test_update_in_place():
    policy = guard("out", "::/0", "::/0", "udp", 4789, ONE)
    assert batch_commands(GuardChanges(replace=(policy,)), ()) == [
        "xfrm policy update src ::/0 dst ::/0 proto 17 dport 4789 dir out mark 0x1 mask 0x1 action block "
        "priority 257867777"]


class FakeRun:
    def __init__(self, fail_on: str | None = None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, argv, timeout=30.0, input_text=None, check=True):
        self.calls.append((argv, input_text))
        if self.fail_on and self.fail_on in " ".join(argv):
            raise CommandError(argv, "exited with status 2", "RTNETLINK answers: File exists\n")
        return Completed(LISTING if argv[1:3] == ["-s", "xfrm"] else "", "")


def test_installer_runs_ip_with_argv_lists():
    run = FakeRun()
    installer = XfrmPolicyInstaller(run=run, timeout=7)
    assert len(installer.policies()) == 9
    installer.run_batch(["xfrm policy add a", "xfrm policy deleteall priority 257867777",
                         "xfrm policy deleteall dir out index 9 priority 257867777", "xfrm policy delete b"])
    installer.run_batch([])
    # iproute2 honours only the first deleteall of a process: each runs on its own, after the batch.
    assert run.calls == [(["ip", "-s", "xfrm", "policy", "list"], None),
                         (["ip", "-batch", "-"], "xfrm policy add a\nxfrm policy delete b\n"),
                         (["ip", "xfrm", "policy", "deleteall", "priority", "257867777"], None),
                         (["ip", "xfrm", "policy", "deleteall", "dir", "out", "index", "9", "priority", "257867777"],
                          None)]


def test_run_each_reports_every_refused_line():
    run = FakeRun(fail_on="dport 6081")
    failures = XfrmPolicyInstaller(run=run).run_each(["xfrm policy add a dport 6081", "xfrm policy add b"])
    assert failures == ["'ip xfrm policy add a dport 6081': RTNETLINK answers: File exists"]
    assert [argv for argv, _ in run.calls] == [["ip", "xfrm", "policy", "add", "a", "dport", "6081"],
                                               ["ip", "xfrm", "policy", "add", "b"]]
