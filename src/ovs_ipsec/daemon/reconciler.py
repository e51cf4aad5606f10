"""The worker that converges the IKE daemon on what OVSDB says, one dirty connection at a time.

It runs in its own thread so that the main loop (OVSDB, unixctl) never waits on the IKE daemon.
Inputs arrive as frozen values through `submit()`, `mark_conns_dirty()` and `refresh()`; the
output is a StatusSnapshot replaced atomically after each pass.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from ..backends.base import Backend
from ..errors import BackendError
from ..guard.enforcer import PlaintextGuard
from ..model import DesiredState, Invalid, ObservedSA, ObservedState, Tunnel, ValidatedState
from ..planner import (
    Action, Initiate, LoadConn, LoadSecret, Memory, Naming, Peering, TerminateChild, UnloadConn, UnloadSecret,
    group_peerings, plan, secret_digest,
)
from ..status.events import EventLog, events_between
from ..status.snapshot import StatusSnapshot, build_snapshot, certificate_statuses
from ..validate import CertificateFacts, certificate_paths, validate
from .backoff import Backoff

log = logging.getLogger("ovs_ipsec.reconciler")

# Observing a few connections one by one is cheaper than listing all of them; past this many,
# one full listing wins.
SCOPED_OBSERVE_LIMIT = 64
# After our IKE daemon restarted, a responder waits this long for its peer's initiator before it
# initiates itself: if both daemons restarted, the initiator's SA is up by then and the responder
# does nothing, so the two never initiate at once (crossing streams).
TAKEOVER_DELAY = 3.0


@dataclass
class _Inbox:
    """What other threads hand to the worker; guarded by the reconciler's condition."""

    desired: DesiredState | None = None
    dirty_conns: set[str] = field(default_factory=set)
    full_resync: bool = True
    waiters: list[threading.Event] = field(default_factory=list)
    stop: bool = False
    cleanup: bool = False


class Reconciler:
    def __init__(self, backend: Backend, inspector, resync_interval: float = 60.0,
                 clock: Callable[[], float] = time.time, events: EventLog | None = None,
                 on_publish: Callable[[], None] = lambda: None, guard: PlaintextGuard | None = None) -> None:
        self._backend = backend
        self._guard = guard  # the plaintext guard (kernel XFRM policies); None: not managed
        # Observability: events go to `events`; `on_publish` is called (in this worker's thread)
        # after each new snapshot, so the main loop can write it back to OVSDB at once.
        self._events = events or EventLog(log)
        self._on_publish = on_publish
        self._facts = CertificateFacts()
        self._pass_started = time.monotonic()
        self._last_full_resync: float | None = None
        self._inspector = inspector
        self._resync_interval = resync_interval
        self._clock = clock
        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        # Worker-only state below: touched by the worker thread alone.
        self._desired_state: DesiredState | None = None
        self._validated = ValidatedState((), ())
        self._peerings: dict[str, Peering] = {}
        self._memo: dict = {}
        self._memo_context: object = None
        self._naming_cache = NamingCache(backend.naming)
        self._status_memo: dict = {}  # for build_snapshot: reuse unchanged tunnels' statuses
        self._grouped: dict[str, Tunnel] = {}  # the tunnels the current peerings were built from
        self._conflicts: tuple[Invalid, ...] = ()  # tunnels refused by group_peerings
        # The IKE daemon's objects as last observed, updated in place by _observe and _record.
        self._conns: dict[str, frozenset[str]] = {}
        self._secrets: set[str] = set()
        self._sas: dict[str, tuple[ObservedSA, ...]] = {}
        self._observed = ObservedState(self._conns, self._secrets, self._sas)
        self._secret_digests: dict[str, str] = {}
        self._backoff = Backoff()
        self._errors: dict[str, str] = {}  # conn name -> why its last action failed
        self._progress: dict[str, tuple[bool, int]] = {}
        self._daemon_id: str | None = None  # the IKE daemon's run, as last observed in full
        self._takeover_at: dict[str, float] = {}  # responder conn -> when it initiates itself
        self._takeover: set[str] = set()  # responder conns initiating until an SA is up
        self._last_resync = 0.0
        self._daemon_error: str | None = None
        self.snapshot = StatusSnapshot.empty()

    # -- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._backend.start_events(self.mark_conns_dirty)

    def submit(self, desired: DesiredState) -> None:
        with self._cond:
            self._inbox.desired = desired
            self._cond.notify()

    def mark_conns_dirty(self, conn_names: frozenset[str] | None) -> None:
        """IKE daemon events: these connections changed; None: look at everything."""
        with self._cond:
            if conn_names is None:
                self._inbox.full_resync = True
            else:
                self._inbox.dirty_conns |= conn_names
            self._cond.notify()

    def refresh(self, timeout: float = 30.0) -> bool:
        """Full resync now; true once it completed within `timeout`."""
        done = threading.Event()
        with self._cond:
            self._inbox.full_resync = True
            self._inbox.waiters.append(done)
            self._cond.notify()
        return done.wait(timeout)

    def queue_depth(self) -> int:
        """Connections marked dirty and not yet taken up by the worker (for metrics; any thread)."""
        with self._cond:
            return len(self._inbox.dirty_conns)

    def stop(self, cleanup: bool, timeout: float = 60.0) -> None:
        with self._cond:
            self._inbox.stop = True
            self._inbox.cleanup = cleanup
            self._cond.notify()
        self._thread.join(timeout)
        self._backend.close()

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(self._has_work, timeout=self._sleep_time())
                inbox, self._inbox = self._inbox, _Inbox(full_resync=False)
            if inbox.stop:
                if inbox.cleanup:
                    self._remove_everything()
                for waiter in inbox.waiters:
                    waiter.set()
                return
            try:
                self._pass(inbox)
            except Exception:  # keep converging: one bug must not stop every tunnel
                log.exception("reconcile pass failed")
            for waiter in inbox.waiters:
                waiter.set()

    def _has_work(self) -> bool:
        inbox = self._inbox
        return bool(inbox.stop or inbox.desired or inbox.dirty_conns or inbox.full_resync or inbox.waiters)

    def _sleep_time(self) -> float:
        wake = self._last_resync + self._resync_interval
        for deadline in (self._backoff.next_deadline(), min(self._takeover_at.values(), default=None)):
            if deadline is not None:
                wake = min(wake, deadline)
        return max(0.0, wake - self._clock()) + 0.01

    def _pass(self, inbox: _Inbox) -> None:
        self._pass_started = time.monotonic()
        now = self._clock()
        if inbox.desired is not None:
            self._desired_state = inbox.desired
        if self._desired_state is None:
            return  # nothing read from OVSDB yet: never act on an empty picture
        full = inbox.full_resync or now >= self._last_resync + self._resync_interval
        dirty = set(self._backoff.due(now)) | inbox.dirty_conns | self._takeovers_due(now)
        guard_changed = False
        invalid_before = self._validated.invalid
        if inbox.desired is not None or full:
            dirty |= self._revalidate(now)
            guard_changed = self._enforce_guard(full)  # before anything reaches the IKE daemon
        if not (full or dirty):
            # Nothing else in this pass would show the guard's new status, or an invalid tunnel
            # that was fixed, removed, or stopped being an IPsec tunnel.
            if guard_changed or self._validated.invalid != invalid_before:
                self._publish(now)
            return
        try:
            self._observe(None if full or len(dirty) > SCOPED_OBSERVE_LIMIT else dirty)
            self._daemon_error = None
        except BackendError as exc:
            self._daemon_unreachable(exc, now)
            return
        if full:
            self._last_resync = self._last_full_resync = now
            dirty = set(self._peerings) | set(self._observed.conns) | set(self._observed.shared_secrets)
        self._note_progress(dirty)
        memory = Memory(self._secret_digests, self._backoff.not_before, frozenset(self._takeover))
        self._apply(plan(self._peerings, self._observed, memory, now, scope=dirty), now)
        if full:
            self._backend.cleanup_credentials({p.tunnels[0].local_key_pem for p in self._peerings.values()
                                               if p.tunnels[0].local_key_pem})
        self._publish(now)

    def _revalidate(self, now: float) -> set[str]:
        """Validate the desired state; return the connections whose desired form changed.

        Certificate files are looked at again each time (the inspector re-reads a file only
        when its inode, size or mtime changed), which is how in-place rotation is noticed.
        """
        desired = self._desired_state
        facts = self._facts = self._certificate_facts(desired)
        context = (desired.global_config, facts, int(now // 3600))  # hourly: expiry depends on time
        if context != self._memo_context:
            self._memo, self._memo_context = {}, context
        validated = validate(desired, facts, now, memo=self._memo)
        peerings, conflicts = self._regroup(validated.tunnels)
        if conflicts:
            clashing = {invalid.name for invalid in conflicts}
            validated = ValidatedState(tuple(t for t in validated.tunnels if t.name not in clashing),
                                       validated.invalid + conflicts, validated.global_problem)
        changed = {name for name in peerings.keys() | self._peerings.keys()
                   if peerings.get(name) is not self._peerings.get(name)
                   and peerings.get(name) != self._peerings.get(name)}
        for name in changed:
            self._backoff.reset(name)
            self._errors.pop(name, None)
        self._validated, self._peerings = validated, peerings
        return changed

    def _regroup(self, tunnels: tuple[Tunnel, ...]) -> tuple[dict[str, Peering], tuple[Invalid, ...]]:
        """Group tunnels into peerings, redoing only the endpoints whose tunnels changed.

        Validation hands back the very same Tunnel object for an unchanged row, so a change to
        one tunnel among thousands regroups one endpoint pair and reuses every other Peering.
        """
        current = {tunnel.name: tunnel for tunnel in tunnels}
        previous = self._grouped
        touched = {(t.local_ip, t.remote_ip) for name in current.keys() | previous.keys()
                   if current.get(name) is not previous.get(name)
                   for t in (current.get(name), previous.get(name)) if t is not None}
        self._grouped = current
        self._naming_cache.prune(current.values())
        if not touched:
            return self._peerings, self._conflicts
        regrouped, conflicts = group_peerings([t for t in tunnels if (t.local_ip, t.remote_ip) in touched],
                                              self._naming_cache.naming)
        peerings = {name: peering for name, peering in self._peerings.items()
                    if (peering.tunnels[0].local_ip, peering.tunnels[0].remote_ip) not in touched}
        peerings.update(regrouped)
        self._conflicts = tuple(c for c in self._conflicts if (c.local_ip, c.remote_ip) not in touched) + conflicts
        return peerings, self._conflicts

    def _certificate_facts(self, desired: DesiredState) -> CertificateFacts:
        certs, keys, chains = certificate_paths(desired)
        return CertificateFacts(
            certs={path: self._inspector.cert(path) for path in certs},
            keys={path: self._inspector.key(path) for path in keys},
            chains={pair: self._inspector.verify_chain(*pair) for pair in chains},
        )

    def _observe(self, scope: Iterable[str] | None) -> None:
        """Refresh the cached observation: everything, or only the connections in scope.

        The cache is updated in place (a scoped look at one connection among thousands must not
        copy thousands of entries), and the ObservedState handed to the planner wraps it.
        """
        if scope is None:
            fresh = self._backend.observe(None)
            self._conns, self._secrets, self._sas = dict(fresh.conns), set(fresh.shared_secrets), dict(fresh.sas)
            self._daemon_restarted(fresh.daemon_id, self._clock())
        else:
            scope = set(scope)
            fresh = self._backend.observe(scope)
            if any(name in self._conns and name not in fresh.conns for name in scope):
                # A connection of ours vanished: charon restarted or someone removed it, so the
                # cached secrets cannot be trusted either. Look at everything now.
                self._observe(None)
                return
            for name in scope:
                self._conns.pop(name, None)
                self._sas.pop(name, None)
            self._conns.update(fresh.conns)
            self._sas.update(fresh.sas)
            # Secrets come from the cache kept in step by _record: listing every secret id for a
            # one-tunnel change would cost O(N); a full resync reads them again.
        self._observed = ObservedState(self._conns, self._secrets, self._sas)

    def _daemon_restarted(self, daemon_id: str | None, now: float) -> None:
        """A full look found a new run of the IKE daemon: every SA it had is gone, and the peers of
        responder connections do not know (see TAKEOVER_DELAY)."""
        known, self._daemon_id = self._daemon_id, daemon_id
        if known is None or daemon_id is None or daemon_id == known:
            return
        responders = [name for name, peering in self._peerings.items() if not peering.initiator]
        log.info("the IKE daemon restarted; %d responder connection(s) initiate in %g s unless their peer "
                 "does first", len(responders), TAKEOVER_DELAY)
        self._takeover_at.update((name, now + TAKEOVER_DELAY) for name in responders)

    def _takeovers_due(self, now: float) -> set[str]:
        due = {name for name, deadline in self._takeover_at.items() if deadline <= now}
        for name in due:
            del self._takeover_at[name]
        self._takeover |= due
        return due

    def _note_progress(self, conn_names: Iterable[str]) -> None:
        """An SA that came up since the last look cancels the connection's initiation backoff,
        and the error of a failed initiation: the SA it asked for is there after all."""
        for name in conn_names:
            up = [sa for sa in self._observed.sas_of(name) if sa.established]
            progress = (bool(up), max((sa.child_sas_installed for sa in up), default=0))
            if progress > self._progress.get(name, (False, 0)):
                self._backoff.reset(name)
                self._errors.pop(name, None)
            if up or name not in self._peerings:
                self._takeover.discard(name)
                self._takeover_at.pop(name, None)
            if name in self._peerings:
                self._progress[name] = progress
            else:
                self._progress.pop(name, None)

    def _apply(self, actions: tuple[Action, ...], now: float) -> None:
        failed: set[str] = set()
        touched: set[str] = set()
        for action in actions:
            name = _conn_of(action)
            if name in failed:
                continue  # later steps of a connection depend on the earlier ones
            touched.add(name)
            try:
                self._backend.apply(action)
            except BackendError as exc:
                failed.add(name)
                self._errors[name] = str(exc)
                delay = self._backoff.failed(name, now)
                log.warning("%s: %s (retry in %.0f s)", self._describe(name), exc, delay)
                if exc.transport:
                    self._daemon_unreachable(exc, now)
                    return
                continue
            self._record(action, now)
        try:
            self._backend.flush()
        except BackendError as exc:
            log.warning("IKE daemon: %s", exc)
            if exc.transport:
                self._daemon_unreachable(exc, now)
                return
        for name in touched - failed:
            self._errors.pop(name, None)
        if actions:
            # One line per pass, not per action: a bulk load of thousands of tunnels would
            # otherwise spend a good part of its time logging (per-action lines are at debug).
            kinds = Counter(type(action).__name__ for action in actions)
            log.info("applied %s for %d connection(s)%s", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                     len(touched), f", {len(failed)} failed" if failed else "")

    def _record(self, action: Action, now: float) -> None:
        """Keep the cached observation in step with what we just did, without asking again."""
        if isinstance(action, LoadSecret):
            self._secrets.add(action.peering.secret_id)
            self._secret_digests[action.peering.secret_id] = secret_digest(action.peering.psk)
            log.debug("%s: loaded the pre-shared key", self._describe(action.peering.conn_name))
        elif isinstance(action, UnloadSecret):
            self._secrets.discard(action.secret_id)
            self._secret_digests.pop(action.secret_id, None)
        elif isinstance(action, LoadConn):
            self._conns[action.peering.conn_name] = frozenset(child for child, _ in action.peering.children)
            log.debug("%s: loaded connection %s", self._describe(action.peering.conn_name), action.peering.conn_name)
        elif isinstance(action, UnloadConn):
            self._conns.pop(action.conn_name, None)
            self._sas.pop(action.conn_name, None)
            log.info("removed connection %s", action.conn_name)
        elif isinstance(action, TerminateChild):
            log.info("%s: ended child SA %s", self._describe(action.conn_name), action.child)
        elif isinstance(action, Initiate):
            # Until charon reports progress, do not initiate again before the backoff delay.
            self._backoff.failed(action.conn_name, now)
            log.debug("%s: initiating %s", self._describe(action.conn_name), action.child)
            if not any(sa.established for sa in self._sas.get(action.conn_name, ())):
                self._sas[action.conn_name] = (ObservedSA(action.conn_name, "", "CONNECTING", None, ()),)

    def _describe(self, conn_name: str) -> str:
        """Name the tunnels behind a connection: every log line says which tunnel it is about."""
        peering = self._peerings.get(conn_name)
        if peering is None:
            return f"connection {conn_name}"
        names = ", ".join(t.name for t in peering.tunnels)
        return f"tunnel{'s' if len(peering.tunnels) > 1 else ''} {names}"

    def _daemon_unreachable(self, exc: BackendError, now: float) -> None:
        if self._daemon_error != str(exc):
            log.error("%s; retrying", exc)
        self._daemon_error = str(exc)
        # Whatever happened to it, look at everything again once it answers: a full resync
        # is scheduled in a few seconds (not at once, which would spin while it is down).
        self._last_resync = now - self._resync_interval + min(5.0, self._resync_interval)
        self._publish(now)

    def _enforce_guard(self, full: bool) -> bool:
        """Converge the plaintext guard (kernel XFRM policies); true when its status changed.

        Called in every pass that read a new configuration, before any IKE action, and on every
        full resync, which repairs policies removed or altered behind our back. It never needs
        the IKE daemon, so it also runs while that one is down."""
        if self._guard is None:
            return False
        desired = self._desired_state
        return self._guard.enforce(desired.global_config.skb_mark, self._validated.tunnels, desired.interfaces, full)

    def _remove_everything(self) -> None:
        if self._guard is not None:
            self._guard.remove_all()
        try:
            for action in plan({}, self._backend.observe(None), Memory({}, {}), self._clock()):
                self._backend.apply(action)
            self._backend.flush()
            self._backend.cleanup_credentials(())
            log.info("removed every connection and secret this daemon created")
        except BackendError as exc:
            log.error("cleanup on exit incomplete: %s", exc)

    def _publish(self, now: float) -> None:
        global_config = self._desired_state.global_config
        stats = self.snapshot.reconcile.after_pass(time.monotonic() - self._pass_started, self._last_full_resync,
                                                   len(self._backoff.not_before))
        snapshot = build_snapshot(self._validated, self._peerings, self._observed, self._errors,
                                  self._daemon_error, global_config, self.snapshot, now,
                                  certificates=certificate_statuses(global_config, self._facts), reconcile=stats,
                                  memo=self._status_memo)
        if self._guard is not None:
            snapshot = replace(snapshot, guard=self._guard.status)
        self._log_transitions(snapshot, now)
        self.snapshot = snapshot
        self._on_publish()

    def _log_transitions(self, snapshot: StatusSnapshot, now: float) -> None:
        """One event per change of state or reason (an invalid tunnel is reported once, not per
        pass), per removal and rekey, and per certificate entering its last days."""
        self._events.emit(events_between(self.snapshot, snapshot, now))


class NamingCache:
    """Backend names per tunnel, computed once per distinct tunnel.

    Names are digests of the rendered parameters; recomputing them for every tunnel on every
    OVSDB change would make a one-tunnel change cost O(N) hashes. Tunnels are frozen, so a
    tunnel seen before has the same names. Keyed by identity (validation reuses the Tunnel object
    of an unchanged row): hashing every field of thousands of tunnels would cost more than it saves.
    """

    def __init__(self, naming: Naming) -> None:
        self._naming = naming
        self._names: dict[int, tuple[Tunnel, tuple[str, str | None, tuple[str, ...]]]] = {}
        self.naming = Naming(conn_name=lambda t: self.names(t)[0], secret_id=lambda t: self.names(t)[1],
                             child_names=lambda t: self.names(t)[2])

    def names(self, tunnel: Tunnel) -> tuple[str, str | None, tuple[str, ...]]:
        entry = self._names.get(id(tunnel))
        if entry is None or entry[0] is not tunnel:
            entry = (tunnel, (self._naming.conn_name(tunnel), self._naming.secret_id(tunnel),
                              self._naming.child_names(tunnel)))
            self._names[id(tunnel)] = entry
        return entry[1]

    def prune(self, current: Iterable[Tunnel]) -> None:
        """Forget tunnels that are gone, once the cache has grown well past the current set."""
        current = list(current)
        if len(self._names) > 2 * len(current) + 64:
            self._names = {id(t): self._names[id(t)] for t in current
                           if id(t) in self._names and self._names[id(t)][0] is t}


def _conn_of(action: Action) -> str:
    if isinstance(action, (LoadSecret, LoadConn)):
        return action.peering.conn_name
    if isinstance(action, UnloadSecret):
        return action.secret_id
    return action.conn_name
