"""One reconcile pass: the desired state and the work due in; the IKE daemon converged, a status out.

No threads here (daemon/worker.py runs passes one after the other) and no clock read except for
timing the pass: `now` comes in, so a unit test drives passes with a fake backend and plain
numbers. Each step is fenced: a row that breaks a rule or a validator is one invalid tunnel, an
action that fails (or hits a bug) is one connection in error with backoff, and the pass goes on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from ..backends.base import ActionDone, Backend, SaEvent
from ..errors import BackendError
from ..guard.enforcer import PlaintextGuard
from ..model import DesiredState
from ..pki.inspect import CertificateInspector
from ..planner import (
    Action,
    Initiate,
    LoadConn,
    LoadSecret,
    Memory,
    Peering,
    UnloadConn,
    UnloadSecret,
    plan,
    protected_conns,
)
from ..status.events import EventLog, events_between
from ..status.snapshot import Placement, StatusSnapshot, build_snapshot, certificate_statuses
from ..text import printable
from .desired import DesiredPeerings
from .observation import ObservationCache
from .workqueue import Work, WorkQueue

log = logging.getLogger("ovs_ipsec.reconciler")

# Observing a few connections' SAs one by one is cheaper than listing all of them; past this many,
# one listing of every SA wins (charon walks all its IKE SAs for each scoped list-sas).
SCOPED_OBSERVE_LIMIT = 64
# After our IKE daemon restarted, a responder waits this long for its peer's initiator before it
# initiates itself: if both daemons restarted, the initiator's SA is up by then and the responder
# does nothing, so the two never initiate at once (crossing streams).
TAKEOVER_DELAY = 3.0


class Reconciler:
    def __init__(self, backend: Backend, inspector: CertificateInspector, queue: WorkQueue,
                 events: EventLog | None = None, guard: PlaintextGuard | None = None,
                 on_publish: Callable[[], None] = lambda: None) -> None:
        self._backend = backend
        self._queue = queue
        self._guard = guard  # the plaintext guard (kernel XFRM policies); None: not managed
        self._events = events or EventLog(log)
        self._on_publish = on_publish  # called after each new snapshot (the OVSDB write-back)
        self.desired = DesiredPeerings(backend.naming, inspector)
        self.observation = ObservationCache(backend)
        self._desired_state: DesiredState | None = None
        self._errors: dict[str, str] = {}  # conn name -> why its last action failed
        self._progress: dict[str, tuple[bool, int]] = {}
        self._takeover: set[str] = set()  # responder conns initiating until an SA is up
        # conn name -> (children initiated, their retry delay, until when they count as tried): see
        # Memory.tried. Until None: asked for with an IKE SA that is not up yet; charon tries them
        # when it comes up, so their delay starts then (see _note_progress).
        self._tried: dict[str, tuple[set[str], float, float | None]] = {}
        self._held: set[str] = set()  # conns whose children's retry was held once (_children_tried)
        self._loaded: dict[str, Peering] = {}  # conn name -> what we last loaded (see Memory.loaded)
        self._daemon_error: str | None = None
        self._pass_error: str | None = None  # why the last pass failed unexpectedly
        self._last_full_resync: float | None = None
        self._pass_started = time.monotonic()
        self._status_memo: dict = {}  # for build_snapshot: reuse unchanged tunnels' statuses
        # Connections whose SA changes since the last pass the daemon's events described in full
        # (note_sa_events): the next pass need not ask about them.
        self._described: set[str] = set()
        # Tunnels whose status may differ from the last snapshot's (None: any of them): the next
        # snapshot looks at these only, so a one-tunnel change costs one status.
        self._status_scope: set[str] | None = set()
        self.snapshot = StatusSnapshot.empty()

    # -- a pass ---------------------------------------------------------------------------------

    def run_pass(self, desired: DesiredState | None, work: Work, now: float) -> None:
        """Converge what `work` names (everything when `work.full`) on the latest desired state."""
        self._pass_started = time.monotonic()
        if desired is not None:
            self._desired_state = desired
        if self._desired_state is None:
            return  # nothing read from OVSDB yet: never act on an empty picture
        failed_before, self._pass_error = self._pass_error, None
        self._takeover |= work.takeovers
        dirty = set(work.keys)
        guard_changed = False
        invalid_before = self.desired.validated.invalid
        if desired is not None or work.full:
            dirty |= self._revalidate(self._desired_state, now)
            self._touch(self.desired.touched_names)
            guard_changed = self._enforce_guard(work.full)  # before anything reaches the IKE daemon
        if not (work.full or dirty):
            # Nothing else in this pass would show the guard's new status, or an invalid tunnel
            # that was fixed, removed, or stopped being an IPsec tunnel.
            if guard_changed or self.desired.validated.invalid != invalid_before or failed_before:
                self._publish(now)
            return
        # What to ask the IKE daemon about: everything on a full pass; otherwise the connections
        # it told us about (events), whose retry is due, or that take over. A connection that is
        # dirty only because its desired form changed is planned on the cache, which our own
        # actions and the daemon's events keep current (and the periodic full pass checks): asking
        # first would cost a one-tunnel change two more VICI requests. After the daemon did not
        # answer, nothing cached is trusted. Otherwise the SAs are what can have changed: the IKE
        # daemon's events are about SAs, and a retry or takeover is about its connection's SA.
        # Connections whose events described the change in full are not asked about at all.
        look = work.keys - self._described
        self._described = set()
        try:
            if work.full or self._daemon_error:
                restarted = self.observation.look(None)
            elif look:
                restarted = self.observation.look_at_sas(None if len(look) > SCOPED_OBSERVE_LIMIT else look)
            else:
                restarted = False
            self._daemon_error = None
        except BackendError as exc:
            self._daemon_unreachable(exc, now)
            return
        if restarted:
            self._daemon_restarted(now)
        observed = self.observation.state
        if work.full:
            self._queue.resynced()
            self._last_full_resync = now
            dirty = set(self.desired.peerings) | set(observed.conns) | set(observed.shared_secrets)
            self._loaded = {name: peering for name, peering in self._loaded.items() if name in observed.conns}
            self._status_scope = None
        self._note_progress(dirty, now)
        protected = protected_conns(observed, self.desired.unprotected_invalid(), self._backend.naming,
                                    scope=None if work.full else dirty)
        tried = self._children_tried(dirty, now)
        memory = Memory(self.observation.secret_digests, self._queue.not_before, frozenset(self._takeover),
                        protected, tried, self._loaded)
        actions = plan(self.desired.peerings, observed, memory, now, scope=dirty,
                       wanted_secrets=self.desired.secret_ids.keys(),
                       make_before_break=self._backend.make_before_break)
        self._rearm_tried(tried, actions, now)
        if self._apply(actions, now) and (work.full or any(isinstance(a, UnloadConn) for a in actions)):
            self._backend.cleanup_credentials(self.desired.peerings.values())
        self._touch(tunnel.name for conn in dirty if (peering := self.desired.peerings.get(conn))
                    for tunnel in peering.tunnels)
        self._publish(now)

    def note_sa_events(self, events: Sequence[SaEvent]) -> None:
        """The daemon's events that describe their SA change in full: into the observation now."""
        if events:
            self.observation.apply_events(events)
            self._described.update(event.conn_name for event in events)

    def pass_failed(self, exc: BaseException, delay: float, now: float) -> None:
        """A pass raised something no step expected: its work was requeued with `delay`."""
        message = f"reconcile pass failed ({type(exc).__name__}: {exc}); retrying in {delay:.0f} s"
        if printable(message) != self._pass_error:
            log.error("%s", message, exc_info=exc)
        self._pass_error = printable(message)
        try:
            self._publish(now)
        except Exception:  # noqa: BLE001 - the status of the failure must not fail the worker
            log.exception("cannot publish the status")

    # -- steps ----------------------------------------------------------------------------------

    def _revalidate(self, desired: DesiredState, now: float) -> set[str]:
        changed = self.desired.update(desired, now)
        for name in changed:
            self._queue.reset(name)
            self._errors.pop(name, None)
        return changed

    def _daemon_restarted(self, now: float) -> None:
        """A full look found a new run of the IKE daemon: every SA it had is gone, and the peers of
        responder connections do not know (see TAKEOVER_DELAY)."""
        responders = [name for name, peering in self.desired.peerings.items() if not peering.initiator]
        # The backoff of every connection counted failures against the daemon that is gone; the new
        # one holds none of them, so each is loaded (and, if ours to start, initiated) now. Without
        # this, a connection whose initiations kept failing stayed unloaded for what was left of
        # its delay (up to BACKOFF_CAP): 40 s in the bench's mesh (bench/README.md, "Full mesh").
        for name in self.desired.peerings:
            self._queue.reset(name)
            self._errors.pop(name, None)
        self._loaded.clear()
        log.info("the IKE daemon restarted; %d responder connection(s) initiate in %g s unless their peer "
                 "does first", len(responders), TAKEOVER_DELAY)
        self._queue.schedule_takeovers(responders, now + TAKEOVER_DELAY)

    def _children_tried(self, conn_names: set[str], now: float) -> dict[str, set[str]]:
        """The connections' children tried within their retry delay (those past it are forgotten).

        A retry that falls due while IKE SAs of ours are still being negotiated is held once, for
        the connection's next backoff delay: it would compete with them for the IKE daemons on both
        ends (a key exchange each), and the child failed already. Held once only, so a peer that never
        answers (its IKE SA connecting for minutes) cannot hold the others' retries for long."""
        tried = {}
        connecting: bool | None = None  # asked once per pass, only when a retry falls due
        for name in conn_names:
            if name not in self._tried:
                continue
            children, delay, until = self._tried[name]
            if name in self.desired.peerings:
                if until is None or until > now:
                    tried[name] = children
                    continue
                if name not in self._held:
                    if connecting is None:
                        connecting = self._ike_sas_connecting()
                    if connecting:  # (the connection's next backoff step: it is looked at again then)
                        self._held.add(name)
                        self._tried[name] = (children, delay, now + self._queue.failed(name, now))
                        tried[name] = children
                        continue
            self._tried.pop(name, None)
            self._held.discard(name)
        return tried

    def _ike_sas_connecting(self) -> bool:
        """Whether an IKE SA of ours is being negotiated (one look at every connection's SAs)."""
        return any(sa.state in ("CREATED", "CONNECTING") for sas in self.observation.state.sas.values() for sa in sas)

    def _rearm_tried(self, tried: dict[str, set[str]], actions: tuple[Action, ...], now: float) -> None:
        """A connection whose missing children were all tried, and that got no initiation now, is
        looked at again when their delay runs out: progress (its IKE SA coming up) cleared the
        backoff that would have brought it back."""
        initiated = {action.conn_name for action in actions if isinstance(action, Initiate)}
        for name, children in tried.items():
            if name in initiated or name in self._queue.not_before:
                continue
            installed = {child for sa in self.observation.state.sas_of(name) for child in sa.installed_children}
            missing = {child for child, _ in self.desired.peerings[name].children} - installed
            if missing and missing <= children:  # otherwise something else is missing: not a matter of waiting
                self._queue.failed(name, now)

    def _note_progress(self, conn_names: set[str], now: float) -> None:
        """An SA that came up since the last look cancels the connection's initiation backoff,
        and the error of a failed initiation: the SA it asked for is there after all; the retry
        delay of the children asked for with it starts now."""
        observed, peerings = self.observation.state, self.desired.peerings
        for name in conn_names:
            up = [sa for sa in observed.sas_of(name) if sa.established]
            progress = (bool(up), max((sa.child_sas_installed for sa in up), default=0))
            children, delay, until = self._tried.get(name, (set(), 0.0, 0.0))
            if up and until is None:
                # The children asked for with this IKE SA were tried as it came up, not when we
                # asked: a burst of thousands takes seconds, and a delay counted from the request
                # had often run out by then, so the failed child was asked for again at once.
                self._tried[name] = (children, delay, now + delay)
            if progress > self._progress.get(name, (False, 0)):
                self._queue.reset(name)
                self._errors.pop(name, None)
            if up or name not in peerings:
                self._takeover.discard(name)
                self._queue.cancel_takeover(name)
            if name in peerings:
                self._progress[name] = progress
            else:
                self._progress.pop(name, None)

    def _apply(self, actions: tuple[Action, ...], now: float) -> bool:
        """Carry out the actions, each fenced; false when the IKE daemon stopped answering."""
        failed: set[str] = set()
        touched: set[str] = set()

        def done(action: Action, error: Exception | None) -> None:
            name = conn_of(action)
            touched.add(name)
            if error is None:
                self.observation.record(action)
                self._after(action, now)
                return
            failed.add(name)
            if isinstance(error, BackendError):
                self._failed(name, str(error), now)
            else:  # a bug in one action costs one connection
                log.debug("%s failed", type(action).__name__, exc_info=error)
                self._failed(name, f"internal error in {type(action).__name__} ({type(error).__name__}: {error}); "
                             "this is a bug, please report it", now)

        try:
            self._carry_out(actions, done, failed)
        except BackendError as exc:
            if not exc.transport:
                raise
            self._daemon_unreachable(exc, now)
            return False
        try:
            deferred = self._backend.flush() or {}
        except BackendError as exc:
            log.warning("IKE daemon: %s", exc)
            if exc.transport:
                self._daemon_unreachable(exc, now)
                return False
            deferred = {}
        for name, why in deferred.items():
            # A deferred load (LibreSwan batches them) that failed: the daemon does not have the
            # connection after all, whatever the cache recorded when the action was queued.
            failed.add(name)
            self._failed(name, str(why), now)
            self.observation.record(UnloadConn(name))
        for name in touched - failed:
            self._errors.pop(name, None)
        if actions:
            # One line per pass, not per action: a bulk load of thousands of tunnels would
            # otherwise spend a good part of its time logging (per-action lines are at debug).
            kinds = Counter(type(action).__name__ for action in actions)
            log.info("applied %s for %d connection(s)%s", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                     len(touched), f", {len(failed)} failed" if failed else "")
        return True

    def _carry_out(self, actions: tuple[Action, ...], done: ActionDone, failed: set[str]) -> None:
        """Hand the actions to the backend; raises BackendError when the daemon stopped answering.

        A backend that can pipeline gets each phase of the plan (`phases`: its removals, and its
        loads with their initiations, in the plan's order) as chains, one per connection, so
        thousands of loads overlap; the next phase starts once the previous one is answered (a
        replacement is in before what it replaces goes).
        Otherwise one action after the other, a connection's later steps skipped once one failed."""
        apply_chains = getattr(self._backend, "apply_chains", None)
        if apply_chains is not None:
            for phase in phases(actions):
                apply_chains(chains([action for action in phase if conn_of(action) not in failed]), done)
            return
        for action in actions:
            if conn_of(action) in failed:
                continue  # later steps of a connection depend on the earlier ones
            try:
                self._backend.apply(action)
            except BackendError as exc:
                if exc.transport:
                    raise
                done(action, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug in one action costs one connection
                done(action, exc)
                continue
            done(action, None)

    def _failed(self, name: str, reason: str, now: float) -> None:
        reason = printable(reason)
        delay = self._queue.failed(name, now)
        if self._errors.get(name) != reason:
            log.warning("%s: %s (retry in %.0f s)", self._describe(name), reason, delay)
        self._errors[name] = reason

    def _after(self, action: Action, now: float) -> None:
        if isinstance(action, LoadSecret):
            log.debug("%s: loaded the pre-shared key", self._describe(action.peering.conn_name))
        elif isinstance(action, LoadConn):
            self._loaded[action.peering.conn_name] = action.peering
            log.debug("%s: loaded connection %s", self._describe(action.peering.conn_name), action.peering.conn_name)
        elif isinstance(action, UnloadConn):
            self._loaded.pop(action.conn_name, None)
            log.info("removed connection %s", action.conn_name)
        elif isinstance(action, Initiate):
            # Until the IKE daemon reports progress, do not initiate again before the backoff delay.
            delay = self._queue.failed(action.conn_name, now)
            children, _, _ = self._tried.get(action.conn_name, (set(), 0.0, 0.0))
            self._held.discard(action.conn_name)
            up = any(sa.established for sa in self.observation.state.sas_of(action.conn_name))
            self._tried[action.conn_name] = (children | {action.child}, delay, now + delay if up else None)
            log.debug("%s: initiating %s", self._describe(action.conn_name), action.child)
        elif not isinstance(action, UnloadSecret):
            log.info("%s: ended child SA %s", self._describe(action.conn_name), action.child)

    def _describe(self, conn_name: str) -> str:
        """Name the tunnels behind a connection: every log line says which tunnel it is about."""
        peering = self.desired.peerings.get(conn_name)
        if peering is None:
            return f"connection {conn_name}"
        names = ", ".join(t.name for t in peering.tunnels)
        return f"tunnel{'s' if len(peering.tunnels) > 1 else ''} {names}"

    def _daemon_unreachable(self, exc: BackendError, now: float) -> None:
        if self._daemon_error != str(exc):
            log.error("%s; retrying", exc)
        self._daemon_error = str(exc)
        self._queue.unreachable(now)
        self._publish(now)

    def _enforce_guard(self, full: bool) -> bool:
        """Converge the plaintext guard (kernel XFRM policies); true when its status changed.

        Called in every pass that read a new configuration, before any IKE action, and on every
        full resync, which repairs policies removed or altered behind our back. It never needs
        the IKE daemon, so it also runs while that one is down."""
        if self._guard is None:
            return False
        validated = self.desired.validated
        return self._guard.enforce(validated.guard, validated.tunnels, full)

    def remove_everything(self, now: float) -> None:
        """exit with cleanup: every connection, secret and guard policy this daemon created."""
        if self._guard is not None:
            self._guard.remove_all()
        try:
            for action in plan({}, self._backend.observe(None), Memory({}, {}), now):
                self._backend.apply(action)
            self._backend.flush()
            self._backend.cleanup_credentials(())
            log.info("removed every connection and secret this daemon created")
        except BackendError as exc:
            log.error("cleanup on exit incomplete: %s", exc)

    def _touch(self, names: Iterable[str]) -> None:
        if self._status_scope is not None:
            self._status_scope.update(names)

    def _publish(self, now: float) -> None:
        desired = self._desired_state
        global_config = desired.global_config if desired is not None else self.snapshot.global_config
        stats = self.snapshot.reconcile.after_pass(time.monotonic() - self._pass_started, self._last_full_resync,
                                                   self._queue.waiting(), self._pass_error)
        # The IKE daemon's reachability shows in every tunnel's status.
        names = self._status_scope if self._daemon_error == self.snapshot.ike_daemon_error else None
        placement = Placement(self.desired.peering_of, self.desired.invalid_of, self.desired.validated.kept)
        snapshot = build_snapshot(self.desired.validated, self.desired.peerings, self.observation.state,
                                  self._errors, self._daemon_error, global_config, self.snapshot, now,
                                  certificates=certificate_statuses(global_config, self.desired.facts),
                                  reconcile=stats, memo=self._status_memo,
                                  not_applicable=self._backend.not_applicable, names=names, placement=placement)
        self._status_scope = set()
        if self._guard is not None:
            snapshot = replace(snapshot, guard=self._guard.status)
        self._events.emit(events_between(self.snapshot, snapshot, now))
        self.snapshot = snapshot
        self._on_publish()


def phases(actions: Sequence[Action]) -> list[list[Action]]:
    """The plan's runs of removals, and of loads (and ended children) with initiations, in its order.

    A connection's initiation goes once its own loads are in, not once every connection's are:
    its IKE SA then starts while the others load (in a burst, charon's key exchanges begin at
    once instead of after the whole load), and the initiations leave at the pace charon answers
    loads, not a thousand at once (which overflowed the peer's UDP socket buffer: bench/README.md,
    Establishment)."""
    def phase(action: Action) -> int:
        return 0 if isinstance(action, (UnloadSecret, UnloadConn)) else 1
    runs: list[list[Action]] = []
    for action in actions:
        if not runs or phase(runs[-1][-1]) != phase(action):
            runs.append([])
        runs[-1].append(action)
    return runs


def chains(actions: Sequence[Action]) -> list[list[Action]]:
    """One chain per connection, its actions in the plan's order; chains in order of first appearance."""
    by_conn: dict[str, list[Action]] = {}
    for action in actions:
        by_conn.setdefault(conn_of(action), []).append(action)
    return list(by_conn.values())


def conn_of(action: Action) -> str:
    if isinstance(action, (LoadSecret, LoadConn)):
        return action.peering.conn_name
    if isinstance(action, UnloadSecret):
        return action.secret_id
    return action.conn_name
