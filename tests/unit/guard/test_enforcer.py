"""The guard's convergence loop against an in-memory kernel that behaves like XFRM and `ip`."""

from __future__ import annotations

import pytest

from testsupport.builders import desired, row
from ovs_ipsec.errors import CommandError
from ovs_ipsec.guard.enforcer import PlaintextGuard
from ovs_ipsec.guard.policy import GUARD_PRIORITY, InstalledPolicy, guard_policies
from ovs_ipsec.guard.xfrm import PROTOCOL_NAMES, XfrmPolicyInstaller
from ovs_ipsec.model import GlobalConfig, GuardConfig, SkbMark
from ovs_ipsec.runner import Completed
from ovs_ipsec.validate import CertificateFacts, validate
from ovs_ipsec.validate.guard import guard_config

ROWS = (row("gnv", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="x"),)
TUNNELS = validate(desired(*ROWS), CertificateFacts(), 0.0).tunnels
FOREIGN = InstalledPolicy("out", "10.0.0.1/32", "10.0.0.9/32", "udp", None, 4789, None, 5000, "block", 1000)


class FakeKernel:
    """XFRM policies behind a fake `ip` (the runner interface), with the real one's habits: policies
    keyed by the kernel's identity (priority excluded); `ip -batch` exits at the first refused line;
    a zero mark value is not sent by `delete`; only the first `deleteall` of a process deletes."""

    def __init__(self, *policies: InstalledPolicy) -> None:
        self.policies: dict[int, InstalledPolicy] = {}
        self.next_index = 1
        self.lists = 0
        self.fail_listing = False
        self.before_batch = lambda lines: None  # a hook for races
        for policy in policies:
            self._insert(policy)

    def installer(self) -> XfrmPolicyInstaller:
        return XfrmPolicyInstaller(run=self.run)

    def run(self, argv, timeout=30.0, input_text=None, check=True):
        if argv[1:] == ["-s", "xfrm", "policy", "list"]:
            self.lists += 1
            if self.fail_listing:
                raise CommandError(argv, "timed out after 30 s")
            return Completed(self._listing(), "")
        if argv[1:] == ["-batch", "-"]:
            lines = input_text.splitlines()
            self.before_batch(lines)
            deleteall_done = False
            for line in lines:
                if line.startswith("xfrm policy deleteall"):
                    if deleteall_done:
                        continue  # iproute2 6.1: the second deleteall of a process deletes nothing
                    deleteall_done = True
                self._run(line, argv)
            return Completed("", "")
        self._run(" ".join(argv[1:]), argv)
        return Completed("", "")

    def ours(self):
        return {p for p in self.policies.values() if p.owned}

    def _listing(self) -> str:
        blocks = []
        for policy in self.policies.values():
            port = f" dport {policy.dport}" if policy.dport is not None else ""
            text = (f"src {policy.src} dst {policy.dst} proto {policy.protocol}{port} \n"
                    f"\tdir {policy.direction} action {policy.action} index {policy.index} "
                    f"priority {policy.priority} ptype main share any flag  (0x00000000)\n")
            if policy.mark is not None:
                text += f"\tmark {policy.mark.value:#x}/{policy.mark.mask:#x} \n"
            blocks.append(text)
        return "".join(blocks)

    def _insert(self, policy: InstalledPolicy, replace: bool = False) -> None:
        same = [i for i, p in self.policies.items() if p.identity == policy.identity]
        if same and not replace:
            raise CommandError(["ip"], "exited with status 2", "RTNETLINK answers: File exists")
        index = same[0] if same else policy.index or self.next_index
        self.next_index += 8
        self.policies[index] = InstalledPolicy(**{**policy.__dict__, "index": index})

    def _run(self, line: str, argv) -> None:
        words = line.split()
        verb, args = words[2], dict(zip(words[3::2], words[4::2]))
        if verb in ("add", "update"):
            mark = SkbMark(int(args["mark"], 0), int(args["mask"], 0)) if "mark" in args else None
            self._insert(InstalledPolicy(args["dir"], args["src"], args["dst"], PROTOCOL_NAMES[args["proto"]], None,
                                         int(args["dport"]) if "dport" in args else None, mark,
                                         int(args["priority"]), args["action"], 0), replace=verb == "update")
        elif verb == "delete":
            policy = self.policies.get(int(args["index"]))
            mark = SkbMark(int(args["mark"], 0), int(args["mask"], 0)) if "mark" in args else None
            if policy is None or policy.mark != mark or (mark is not None and mark.value == 0):
                raise CommandError(argv, "exited with status 2", "RTNETLINK answers: No such file or directory")
            del self.policies[policy.index]
        elif verb == "deleteall":
            for index, policy in list(self.policies.items()):
                if (str(policy.priority) == args.get("priority", str(policy.priority))
                        and str(index) == args.get("index", str(index))
                        and policy.direction == args.get("dir", policy.direction)):
                    del self.policies[index]


def config(mode: str | None, rows=ROWS) -> GuardConfig:
    return guard_config(GlobalConfig(skb_mark=mode), rows)


def as_installed(policies):
    return {(p.direction, p.src, p.dst, p.protocol, p.dport, p.mark) for p in policies}


def test_guard_comes_up_and_status_says_so():
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel.installer())
    assert guard.enforce(config("0/1"), TUNNELS, full=False)
    assert as_installed(kernel.ours()) == as_installed(guard_policies(SkbMark(0, 1), TUNNELS, config('0/1').traffic))
    assert guard.status.as_json() == {"mode": "0/1", "configured": "0/1", "error": None, "in_place": True,
                                      "policies": 9, "wanted": 9, "uncovered": []}
    assert FOREIGN in kernel.policies.values()


def test_unrelated_changes_cost_no_command_and_a_full_pass_repairs_drift():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("1/1"), TUNNELS, full=False)
    lists = kernel.lists
    assert not guard.enforce(config("1/1"), TUNNELS, full=False)
    assert kernel.lists == lists
    removed = next(iter(kernel.ours()))
    del kernel.policies[removed.index]  # someone ran `ip xfrm policy delete`
    guard.enforce(config("1/1"), TUNNELS, full=True)
    assert as_installed(kernel.ours()) == as_installed(guard_policies(SkbMark(1, 1), TUNNELS, config('1/1').traffic))


def test_turning_the_mode_off_removes_exactly_our_policies():
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("0/1"), TUNNELS, full=False)
    assert guard.enforce(config(None), TUNNELS, full=False)
    assert list(kernel.policies.values()) == [FOREIGN]
    assert guard.status.mode == "off" and guard.status.in_place


def test_mode_change_swaps_the_marks():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("0/1"), TUNNELS, full=False)
    guard.enforce(config("1/1"), TUNNELS, full=False)
    assert {p.mark for p in kernel.ours() if p.direction == "out"} == {SkbMark(1, 1)}
    assert guard.status.in_place and guard.status.mode == "1/1"


def test_malformed_value_keeps_the_previous_mode_in_force_and_says_why():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("0/1", ()), (), full=False)
    guard.enforce(config("0/one"), TUNNELS, full=False)  # a typo, and a new tunnel at the same time
    status = guard.status
    assert status.mode == "0/1" and status.configured == "0/one" and status.in_place
    assert "mask 'one' is not a number" in status.error and "keeping the guard in force (mode 0/1)" in status.error
    assert as_installed(kernel.ours()) == as_installed(guard_policies(SkbMark(0, 1), TUNNELS, config('0/1').traffic))


@pytest.mark.parametrize("mark", [SkbMark(1, 1), SkbMark(0, 1)])
def test_malformed_value_at_start_reads_the_mode_back_from_the_kernel(mark):
    kernel = FakeKernel()
    PlaintextGuard(kernel.installer()).enforce(config(str(mark)), TUNNELS, full=False)  # the previous run
    before = set(kernel.policies.values())
    guard = PlaintextGuard(kernel.installer())  # the monitor restarted
    guard.enforce(config("2/1"), TUNNELS, full=False)
    assert set(kernel.policies.values()) == before
    assert guard.status.mode == str(mark) and "bits outside mask" in guard.status.error


def test_malformed_value_at_start_with_no_guard_stays_off():
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("bogus"), TUNNELS, full=False)
    assert list(kernel.policies.values()) == [FOREIGN]
    assert guard.status.mode == "off" and "keeping the guard in force (the policies in the kernel)" in \
        guard.status.error


def test_a_foreign_policy_in_the_way_is_reported_and_everything_else_installed():
    inbound = next(p for p in guard_policies(SkbMark(0, 1), TUNNELS) if p.direction == "in")
    theirs = InstalledPolicy("in", inbound.src, inbound.dst, inbound.protocol, None, inbound.dport, None, 300,
                             "allow", 1000)
    kernel = FakeKernel(theirs)
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("0/1"), TUNNELS, full=False)
    assert len(kernel.ours()) == 8 and theirs in kernel.policies.values()
    assert not guard.status.in_place
    assert "a foreign XFRM policy (priority 300, action allow) holds the place of guard policy in 10.0.0.2/32" \
        in guard.status.error


def test_a_batch_stopped_by_a_race_is_finished_one_command_at_a_time():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel.installer())

    def racing_batch(lines):  # someone adds a policy at the first place between our list and our add
        words = lines[0].split()
        args = dict(zip(words[3::2], words[4::2]))
        kernel._insert(InstalledPolicy(args["dir"], args["src"], args["dst"], PROTOCOL_NAMES[args["proto"]], None,
                                       int(args["dport"]) if "dport" in args else None,
                                       SkbMark(int(args["mark"], 0), int(args["mask"], 0)) if "mark" in args
                                       else None, 7, "block", 0))
        kernel.before_batch = lambda lines: None

    kernel.before_batch = racing_batch
    guard.enforce(config("0/1"), TUNNELS, full=False)
    assert len(kernel.ours()) == 8 and not guard.status.in_place
    assert "foreign XFRM policy (priority 7, action block)" in guard.status.error


def test_a_kernel_we_cannot_read_is_an_error_in_status():
    kernel = FakeKernel()
    kernel.fail_listing = True
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("0/1"), TUNNELS, full=False)
    assert not guard.status.in_place and "cannot list XFRM policies: ip timed out" in guard.status.error
    kernel.fail_listing = False
    guard.enforce(config("0/1"), TUNNELS, full=False)  # not converged last time: tried again
    assert guard.status.in_place and guard.status.error is None


def test_remove_all_on_exit_leaves_foreign_policies():
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("0/1"), TUNNELS, full=False)
    guard.remove_all()
    assert list(kernel.policies.values()) == [FOREIGN]


def test_priority_in_use_is_the_owned_one():
    kernel = FakeKernel()
    PlaintextGuard(kernel.installer()).enforce(config("0/1", ()), (), full=False)
    assert {p.priority for p in kernel.policies.values()} == {GUARD_PRIORITY}


def test_malformed_value_at_start_with_an_unreadable_mode_touches_nothing():
    mixed = [InstalledPolicy("out", "0.0.0.0/0", "0.0.0.0/0", "gre", None, None, mark, GUARD_PRIORITY, "block", 8 + i)
             for i, mark in enumerate((SkbMark(0, 1), SkbMark(1, 1)))]
    kernel = FakeKernel(*mixed)
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("x"), TUNNELS, full=False)
    assert set(kernel.policies.values()) == set(mixed)
    assert guard.status.mode == "unknown" and guard.status.installed == 2 and "is not a number" in guard.status.error


MODES = (None, "0/1", "1/1", "0x2/0x2", "0x10/0x10")


@pytest.mark.parametrize("before", MODES)
@pytest.mark.parametrize("after", MODES)
def test_every_mode_transition_is_exact_after_one_pass(before, after):
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config(before), TUNNELS, full=False)
    guard.enforce(config(after), TUNNELS, full=False)
    wanted = config(after)
    assert as_installed(kernel.ours()) == as_installed(guard_policies(wanted.mark, TUNNELS, wanted.traffic))
    assert guard.status.in_place and guard.status.error is None
    assert guard.status.mode == ("off" if after is None else str(wanted.mark))
    assert FOREIGN in kernel.policies.values()


def test_a_full_pass_repairs_any_drift_in_one_pass():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel.installer())
    guard.enforce(config("0/1"), TUNNELS, full=False)
    for policy in list(kernel.ours())[:3]:
        del kernel.policies[policy.index]  # removed behind our back
    stale = next(iter(kernel.ours()))
    kernel.policies[stale.index] = InstalledPolicy(**{**stale.__dict__, "action": "allow"})  # altered
    kernel._insert(InstalledPolicy("out", "0.0.0.0/0", "0.0.0.0/0", "udp", None, 9999, SkbMark(0, 1),
                                   GUARD_PRIORITY, "block", 0))  # one of ours nobody wants
    guard.enforce(config("0/1"), TUNNELS, full=True)
    wanted = config("0/1")
    assert as_installed(kernel.ours()) == as_installed(guard_policies(wanted.mark, TUNNELS, wanted.traffic))
    assert all(p.action == "block" for p in kernel.ours()) and guard.status.in_place
