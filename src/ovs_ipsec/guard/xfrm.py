"""The kernel side of the plaintext guard: `ip xfrm policy`, in the monitor's network namespace.

`parse_policies` and `batch_commands` are pure (text in, values out, values in, text out); the
`XfrmPolicyInstaller` only runs `ip` through the one subprocess runner. The guard never depends
on the IKE daemon: `ip` talks to the kernel directly.

iproute2 quirks this module works around (iproute2 6.1):
* `ip xfrm policy delete ... mark 0 mask M` sends no mark at all (it omits a zero mark value), so
  the kernel finds no policy. Policies with a zero mark value are removed with `deleteall`, which
  is filtered by index and priority and copies the mark from the listed policy.
* `ip xfrm policy list` shows the index only with `-s`.
* `ip -batch` stops at the first xfrm line the kernel refuses, even with `-force` (ip xfrm exits):
  after a failed batch the caller redoes what is left one command at a time.
* Only the first `deleteall` of one `ip` process deletes anything: each runs in its own process.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from types import MappingProxyType

from .. import runner
from ..errors import CommandError
from ..model import SkbMark
from .policy import GuardChanges, GuardPolicy, InstalledPolicy

PROTOCOL_NUMBERS = MappingProxyType({"gre": 47, "udp": 17, "tcp": 6})
DELETEALL = "xfrm policy deleteall"
PROTOCOL_NAMES = MappingProxyType({str(number): name for name, number in PROTOCOL_NUMBERS.items()})


def parse_policies(text: str) -> tuple[InstalledPolicy, ...]:
    """`ip -s xfrm policy list` -> every policy in it (ours and everyone else's)."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    return tuple(policy for policy in map(_parse_block, blocks) if policy is not None)


def _parse_block(lines: list[str]) -> InstalledPolicy | None:
    selector = _pairs(lines[0].split())
    if len(lines) < 2 or "src" not in selector or "dst" not in selector:
        return None
    header = lines[1].split()
    if not header or header[0] not in ("dir", "socket") or len(header) < 2:
        return None
    direction = header[1] if header[0] == "dir" else f"socket-{header[1]}"
    attributes = _pairs(header[2:])
    mark = None
    templates = other = False
    for line in lines[2:]:
        words = line.split()
        if words[0] == "mark" and len(words) > 1:
            value, _, mask = words[1].partition("/")
            mark = SkbMark(int(value, 0), int(mask or "0xffffffff", 0))
        elif words[0] == "tmpl":
            templates = True
        elif words[0] in ("if_id", "security"):
            other = True
    protocol = selector.get("proto")
    try:
        return InstalledPolicy(
            direction=direction,
            src=_network(selector["src"]),
            dst=_network(selector["dst"]),
            protocol=PROTOCOL_NAMES.get(protocol, protocol) if protocol else None,
            sport=int(selector["sport"]) if "sport" in selector else None,
            dport=int(selector["dport"]) if "dport" in selector else None,
            mark=mark,
            priority=int(attributes.get("priority", "0")),
            action=attributes.get("action", "allow"),
            index=int(attributes.get("index", "0")),
            templates=templates,
            other=other or "dev" in selector or attributes.get("ptype", "main") != "main",
        )
    except ValueError:
        return None  # a shape we do not understand is certainly not ours


def _pairs(words: list[str]) -> dict[str, str]:
    return {words[i]: words[i + 1] for i in range(0, len(words) - 1, 2)}


def _network(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def batch_commands(changes: GuardChanges, installed: Iterable[InstalledPolicy]) -> list[str]:
    """The `ip -batch` lines for the changes: additions and in-place updates first, so that a
    mode change never leaves a moment without a guard, then removals."""
    lines = [_add_command("add", policy) for policy in changes.add]
    lines += [_add_command("update", policy) for policy in changes.replace]
    owned_by_priority: dict[int, set[int]] = {}
    for policy in installed:
        if policy.owned:
            owned_by_priority.setdefault(policy.priority, set()).add(policy.index)
    removing: dict[int, list[InstalledPolicy]] = {}
    for policy in changes.remove:
        removing.setdefault(policy.priority, []).append(policy)
    adding = {policy.priority for policy in changes.add + changes.replace}
    for priority, policies in sorted(removing.items()):
        if (len(policies) > 1 and priority not in adding
                and {p.index for p in policies} == owned_by_priority.get(priority)):
            # Every policy of ours at this priority goes, and none comes: one filtered listing
            # instead of one per policy.
            lines.append(f"xfrm policy deleteall priority {priority}")
        else:
            lines += [_remove_command(policy) for policy in policies]
    return lines


def _add_command(verb: str, policy: GuardPolicy) -> str:
    words = ["xfrm", "policy", verb, "src", policy.src, "dst", policy.dst,
             "proto", str(PROTOCOL_NUMBERS[policy.protocol])]
    if policy.dport is not None:
        words += ["dport", str(policy.dport)]
    words += ["dir", policy.direction]
    if policy.mark is not None:
        words += ["mark", f"{policy.mark.value:#x}", "mask", f"{policy.mark.mask:#x}"]
    words += ["action", "block", "priority", str(policy.priority)]
    return " ".join(words)


def _remove_command(policy: InstalledPolicy) -> str:
    if policy.mark is not None and policy.mark.value == 0:
        return f"xfrm policy deleteall dir {policy.direction} index {policy.index} priority {policy.priority}"
    mark = f" mark {policy.mark.value:#x} mask {policy.mark.mask:#x}" if policy.mark is not None else ""
    return f"xfrm policy delete dir {policy.direction} index {policy.index}{mark}"


class XfrmPolicyInstaller:
    """Lists and changes the kernel's XFRM policies of the namespace the monitor runs in."""

    def __init__(self, run: Callable[..., runner.Completed] = runner.run, ip: str = "ip",
                 timeout: float = 30.0) -> None:
        self._run = run
        self._ip = ip
        self._timeout = timeout

    def policies(self) -> tuple[InstalledPolicy, ...]:
        """Every XFRM policy of the namespace; raises CommandError."""
        return parse_policies(self._run([self._ip, "-s", "xfrm", "policy", "list"], timeout=self._timeout).stdout)

    def run_batch(self, lines: list[str]) -> None:
        """All lines in as few `ip` processes as possible; raises CommandError.

        `ip xfrm` exits at the first line the kernel refuses (even with -force), so after a
        failure the later lines never ran. And iproute2 carries out only the first `deleteall`
        of a process (its dump filter is not reset between batch lines: a second one silently
        deletes nothing), so each `deleteall` runs as an `ip` of its own, after the batch.
        """
        batched = [line for line in lines if not line.startswith(DELETEALL)]
        if batched:
            self._run([self._ip, "-batch", "-"], timeout=self._timeout, input_text="\n".join(batched) + "\n")
        for line in lines:
            if line.startswith(DELETEALL):
                self._run([self._ip, *line.split()], timeout=self._timeout)

    def run_each(self, lines: list[str]) -> list[str]:
        """One `ip` per line, to learn which ones fail; returns the failures."""
        failures = []
        for line in lines:
            try:
                self._run([self._ip, *line.split()], timeout=self._timeout)
            except CommandError as exc:
                failures.append(f"'ip {line}': {exc.stderr.strip() or exc.reason}")
        return failures
