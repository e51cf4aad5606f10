"""The guard's convergence loop against an in-memory kernel that behaves like XFRM and `ip`."""

from __future__ import annotations

import pytest

from builders import desired, row
from ovs_ipsec.errors import CommandError
from ovs_ipsec.guard.enforcer import PlaintextGuard
from ovs_ipsec.guard.policy import GUARD_PRIORITY, InstalledPolicy, guard_policies
from ovs_ipsec.guard.xfrm import PROTOCOL_NAMES
from ovs_ipsec.model import SkbMark
from ovs_ipsec.validate import CertificateFacts, validate

ROWS = (row("gnv", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="x"),)
TUNNELS = validate(desired(*ROWS), CertificateFacts(), 0.0).tunnels
FOREIGN = InstalledPolicy("out", "10.0.0.1/32", "10.0.0.9/32", "udp", None, 4789, None, 5000, "block", 1000)


class FakeKernel:
    """Policies keyed by the kernel's identity (priority excluded); `ip xfrm` exits at the first
    refused line of a batch, as the real one does."""

    def __init__(self, *policies: InstalledPolicy) -> None:
        self.policies: dict[int, InstalledPolicy] = {}
        self.next_index = 1
        self.lists = 0
        self.fail_listing = False
        for policy in policies:
            self._insert(policy)

    def list(self):
        self.lists += 1
        if self.fail_listing:
            raise CommandError(["ip"], "timed out after 30 s")
        return tuple(self.policies.values())

    def run_batch(self, lines):
        for line in lines:
            self._run(line)

    def run_each(self, lines):
        failures = []
        for line in lines:
            try:
                self._run(line)
            except CommandError as exc:
                failures.append(f"'ip {line}': {exc.stderr}")
        return failures

    def ours(self):
        return {p for p in self.policies.values() if p.owned}

    def _insert(self, policy: InstalledPolicy, replace: bool = False) -> None:
        same = [i for i, p in self.policies.items() if p.identity == policy.identity]
        if same and not replace:
            raise CommandError(["ip"], "exited with status 2", "RTNETLINK answers: File exists")
        index = same[0] if same else policy.index or self.next_index
        self.next_index += 8
        self.policies[index] = InstalledPolicy(**{**policy.__dict__, "index": index})

    def _run(self, line: str) -> None:
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
            if policy is None or policy.mark != mark:
                raise CommandError(["ip"], "exited with status 2", "RTNETLINK answers: No such file or directory")
            del self.policies[policy.index]
        elif verb == "deleteall":
            for index, policy in list(self.policies.items()):
                if (str(policy.priority) == args.get("priority", str(policy.priority))
                        and str(index) == args.get("index", str(index))
                        and policy.direction == args.get("dir", policy.direction)):
                    del self.policies[index]


def as_installed(policies):
    return {(p.direction, p.src, p.dst, p.protocol, p.dport, p.mark) for p in policies}


def test_guard_comes_up_and_status_says_so():
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel)
    assert guard.enforce("0/1", TUNNELS, ROWS, full=False)
    assert as_installed(kernel.ours()) == as_installed(guard_policies(SkbMark(0, 1), TUNNELS, ROWS))
    assert guard.status.as_json() == {"mode": "0/1", "configured": "0/1", "error": None, "in_place": True,
                                      "policies": 9, "wanted": 9}
    assert FOREIGN in kernel.policies.values()


def test_unrelated_changes_cost_no_command_and_a_full_pass_repairs_drift():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel)
    guard.enforce("1/1", TUNNELS, ROWS, full=False)
    lists = kernel.lists
    assert not guard.enforce("1/1", TUNNELS, ROWS, full=False)
    assert kernel.lists == lists
    removed = next(iter(kernel.ours()))
    del kernel.policies[removed.index]  # someone ran `ip xfrm policy delete`
    guard.enforce("1/1", TUNNELS, ROWS, full=True)
    assert as_installed(kernel.ours()) == as_installed(guard_policies(SkbMark(1, 1), TUNNELS, ROWS))


def test_turning_the_mode_off_removes_exactly_our_policies():
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel)
    guard.enforce("0/1", TUNNELS, ROWS, full=False)
    assert guard.enforce(None, TUNNELS, ROWS, full=False)
    assert list(kernel.policies.values()) == [FOREIGN]
    assert guard.status.mode == "off" and guard.status.in_place


def test_mode_change_swaps_the_marks():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel)
    guard.enforce("0/1", TUNNELS, ROWS, full=False)
    guard.enforce("1/1", TUNNELS, ROWS, full=False)
    assert {p.mark for p in kernel.ours() if p.direction == "out"} == {SkbMark(1, 1)}
    assert guard.status.in_place and guard.status.mode == "1/1"


def test_malformed_value_keeps_the_previous_mode_in_force_and_says_why():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel)
    guard.enforce("0/1", (), (), full=False)
    guard.enforce("0/one", TUNNELS, ROWS, full=False)  # a typo, and a new tunnel at the same time
    status = guard.status
    assert status.mode == "0/1" and status.configured == "0/one" and status.in_place
    assert "mask 'one' is not a number" in status.error and "keeping the guard in force (mode 0/1)" in status.error
    assert as_installed(kernel.ours()) == as_installed(guard_policies(SkbMark(0, 1), TUNNELS, ROWS))


@pytest.mark.parametrize("mark", [SkbMark(1, 1), SkbMark(0, 1)])
def test_malformed_value_at_start_reads_the_mode_back_from_the_kernel(mark):
    kernel = FakeKernel()
    PlaintextGuard(kernel).enforce(str(mark), TUNNELS, ROWS, full=False)  # the previous run
    before = set(kernel.policies.values())
    guard = PlaintextGuard(kernel)  # the monitor restarted
    guard.enforce("2/1", TUNNELS, ROWS, full=False)
    assert set(kernel.policies.values()) == before
    assert guard.status.mode == str(mark) and "bits outside mask" in guard.status.error


def test_malformed_value_at_start_with_no_guard_stays_off():
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel)
    guard.enforce("bogus", TUNNELS, ROWS, full=False)
    assert list(kernel.policies.values()) == [FOREIGN]
    assert guard.status.mode == "off" and "keeping the guard in force (the policies in the kernel)" in \
        guard.status.error


def test_a_foreign_policy_in_the_way_is_reported_and_everything_else_installed():
    inbound = next(p for p in guard_policies(SkbMark(0, 1), TUNNELS) if p.direction == "in")
    theirs = InstalledPolicy("in", inbound.src, inbound.dst, inbound.protocol, None, inbound.dport, None, 300,
                             "allow", 1000)
    kernel = FakeKernel(theirs)
    guard = PlaintextGuard(kernel)
    guard.enforce("0/1", TUNNELS, ROWS, full=False)
    assert len(kernel.ours()) == 8 and theirs in kernel.policies.values()
    assert not guard.status.in_place
    assert "a foreign XFRM policy (priority 300, action allow) holds the place of guard policy in 10.0.0.2/32" \
        in guard.status.error


def test_a_batch_stopped_by_a_race_is_finished_one_command_at_a_time():
    kernel = FakeKernel()
    guard = PlaintextGuard(kernel)
    real_batch = kernel.run_batch

    def racing_batch(lines):  # someone adds a policy at the first place between our list and our add
        words = lines[0].split()
        args = dict(zip(words[3::2], words[4::2]))
        kernel._insert(InstalledPolicy(args["dir"], args["src"], args["dst"], PROTOCOL_NAMES[args["proto"]], None,
                                       int(args["dport"]) if "dport" in args else None,
                                       SkbMark(int(args["mark"], 0), int(args["mask"], 0)) if "mark" in args
                                       else None, 7, "block", 0))
        real_batch(lines)

    kernel.run_batch = racing_batch
    guard.enforce("0/1", TUNNELS, ROWS, full=False)
    assert len(kernel.ours()) == 8 and not guard.status.in_place
    assert "foreign XFRM policy (priority 7, action block)" in guard.status.error


def test_a_kernel_we_cannot_read_is_an_error_in_status():
    kernel = FakeKernel()
    kernel.fail_listing = True
    guard = PlaintextGuard(kernel)
    guard.enforce("0/1", TUNNELS, ROWS, full=False)
    assert not guard.status.in_place and "cannot list XFRM policies: ip timed out" in guard.status.error
    kernel.fail_listing = False
    guard.enforce("0/1", TUNNELS, ROWS, full=False)  # not converged last time: tried again
    assert guard.status.in_place and guard.status.error is None


def test_remove_all_on_exit_leaves_foreign_policies():
    kernel = FakeKernel(FOREIGN)
    guard = PlaintextGuard(kernel)
    guard.enforce("0/1", TUNNELS, ROWS, full=False)
    guard.remove_all()
    assert list(kernel.policies.values()) == [FOREIGN]


def test_priority_in_use_is_the_owned_one():
    kernel = FakeKernel()
    PlaintextGuard(kernel).enforce("0/1", (), (), full=False)
    assert {p.priority for p in kernel.policies.values()} == {GUARD_PRIORITY}


def test_malformed_value_at_start_with_an_unreadable_mode_touches_nothing():
    mixed = [InstalledPolicy("out", "0.0.0.0/0", "0.0.0.0/0", "gre", None, None, mark, GUARD_PRIORITY, "block", 8 + i)
             for i, mark in enumerate((SkbMark(0, 1), SkbMark(1, 1)))]
    kernel = FakeKernel(*mixed)
    guard = PlaintextGuard(kernel)
    guard.enforce("x", TUNNELS, ROWS, full=False)
    assert set(kernel.policies.values()) == set(mixed)
    assert guard.status.mode == "unknown" and guard.status.installed == 2 and "is not a number" in guard.status.error
