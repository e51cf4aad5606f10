"""Keeps the kernel's guard policies equal to what the configuration asks for.

Used by the reconciler's worker thread only: once per pass where the configuration changed, and
on every full resync (which is how a policy removed or altered behind our back comes back). It
never talks to the IKE daemon, so the guard is in place before the first connection is loaded
and stays converged while the IKE daemon is down.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ..errors import CommandError
from ..model import GuardConfig, SkbMark, Tunnel
from .policy import (
    GuardChanges,
    GuardPolicy,
    GuardStatus,
    InstalledPolicy,
    guard_policies,
    mark_in_force,
    plan_changes,
)
from .xfrm import XfrmPolicyInstaller, batch_commands

log = logging.getLogger("ovs_ipsec.guard")


@dataclass(frozen=True)
class _Target:
    configured: str | None
    mark: SkbMark | None
    policies: frozenset[GuardPolicy]


class PlaintextGuard:
    """The guard's state between passes: the last mode in force and the last status."""

    def __init__(self, installer: XfrmPolicyInstaller) -> None:
        self._installer = installer
        self._mark: SkbMark | None = None  # the last mode in force...
        self._mark_known = False  # ...known once a valid value was read or the kernel told it
        self._target: _Target | None = None
        self.status = GuardStatus()

    def enforce(self, config: GuardConfig, tunnels: Iterable[Tunnel], full: bool) -> bool:
        """Converge the kernel on the guard for this configuration; true when the status changed.

        `tunnels` are the IPsec tunnels in force. Without `full`, the kernel is looked at only
        when the desired guard changed or the last attempt did not converge: an unrelated OVSDB
        change costs no `ip` command.
        """
        tunnels = tuple(tunnels)
        problem = None
        if config.error is None:
            self._mark, self._mark_known = config.mark, True
        else:
            kept = f"mode {self._mark or 'off'}" if self._mark_known else "the policies in the kernel"
            problem = f"{config.error}; keeping the guard in force ({kept})"
        target = _Target(config.configured, self._mark,
                         guard_policies(self._mark, tunnels, config.traffic) if self._mark_known else frozenset())
        before = self.status
        self.status = replace(self.status, uncovered=config.uncovered)
        if not full and target == self._target and self.status.in_place:
            return self.status != before
        if full and not target.policies and target == self._target and self.status.in_place \
                and not self.status.installed:
            # Guard off and none of ours found last time: listing the whole policy table (tens of
            # thousands of the IKE daemon's policies at scale) on every resync would buy nothing.
            return self.status != before
        self.status = replace(self._converge(target, problem, tunnels, config.traffic), uncovered=config.uncovered)
        self._target = target
        if self.status != before and self.status.error and self.status.error != before.error:
            log.warning("plaintext guard: %s", self.status.error)
        return self.status != before

    def remove_all(self) -> None:
        """Remove every policy of ours (exit with cleanup)."""
        self._mark, self._mark_known = None, True
        try:
            installed = self._installer.policies()
        except CommandError as exc:
            log.error("plaintext guard: cleanup on exit incomplete: %s", exc)
            return
        changes = plan_changes(frozenset(), installed)
        if changes.remove:
            _, failures = self._apply(frozenset(), changes, installed)
            if failures:
                log.error("plaintext guard: cleanup on exit incomplete: %s", _summary(failures))

    def _converge(self, target: _Target, problem: str | None, tunnels: tuple[Tunnel, ...],
                  traffic: frozenset[tuple[str, int | None]]) -> GuardStatus:
        try:
            installed = self._installer.policies()
        except CommandError as exc:
            return GuardStatus(target.configured, target.mark, _join(problem, f"cannot list XFRM policies: {exc}"),
                               in_place=False, wanted=len(target.policies), installed=self.status.installed)
        policies = target.policies
        if not self._mark_known:
            # A malformed value and no memory of the previous one (the monitor just started):
            # the policies in the kernel tell which mode was in force.
            known, mark = mark_in_force(installed)
            if not known:
                return GuardStatus(target.configured, None, problem, in_place=True, unknown=True,
                                   installed=sum(p.owned for p in installed))
            self._mark, self._mark_known = mark, True
            policies = guard_policies(mark, tunnels, traffic)
        changes = plan_changes(policies, installed)
        failures: list[str] = []
        if changes.add or changes.replace or changes.remove:
            installed, failures = self._apply(policies, changes, installed)
            changes = plan_changes(policies, installed)
        failures += [f"a foreign XFRM policy (priority {theirs.priority}, action {theirs.action}) holds "
                     f"the place of guard policy {ours}" for ours, theirs in changes.blocked]
        error = _join(problem, _summary(failures))
        return GuardStatus(target.configured, self._mark, error, in_place=changes.converged,
                           installed=sum(p.owned for p in installed), wanted=len(policies))

    def _apply(self, policies: frozenset[GuardPolicy], changes: GuardChanges,
               installed: tuple[InstalledPolicy, ...]) -> tuple[tuple[InstalledPolicy, ...], list[str]]:
        failures: list[str] = []
        try:
            try:
                self._installer.run_batch(batch_commands(changes, installed))
            except CommandError:
                # The batch stopped at a refused line: finish one command at a time, to know which.
                installed = self._installer.policies()
                changes = plan_changes(policies, installed)
                failures = self._installer.run_each(batch_commands(changes, installed))
            after = self._installer.policies()
        except CommandError as exc:
            return installed, [str(exc)]
        log.info("plaintext guard %s: %d XFRM policies added, %d updated, %d removed",
                 self._mark if self._mark is not None else "off", len(changes.add), len(changes.replace),
                 len(changes.remove))
        return after, failures


def _summary(failures: list[str]) -> str | None:
    if not failures:
        return None
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return failures[0] + more


def _join(*problems: str | None) -> str | None:
    return "; ".join(p for p in problems if p) or None
