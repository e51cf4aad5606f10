"""The reconciler's thread: other threads hand it work; it runs one pass at a time.

The main loop (OVSDB, unixctl) and the IKE daemon's event listener never wait on the IKE daemon:
they put frozen values in the inbox and return. The worker takes the inbox, adds it to the work
queue and runs a pass; a pass that raises anything unexpected has its work requeued with backoff
(the keys are not lost until the next resync) and the failure shows in status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..backends.base import Backend, SaEvent
from ..model import DesiredState
from ..status.snapshot import StatusSnapshot
from .reconciler import Reconciler
from .workqueue import WorkQueue

log = logging.getLogger("ovs_ipsec.reconciler")

# The IKE daemon's events start a pass at most this long after the previous one ended: in an
# establishment burst thousands arrive within seconds, and a pass per event (its status snapshot,
# its OVSDB write-back) cost both monitors more CPU than the events' own work, on hosts where the
# IKE daemons keep every core busy. A new configuration never waits.
EVENT_BATCH = 0.05


@dataclass
class _Inbox:
    """What other threads hand to the worker; guarded by the worker's condition."""

    desired: DesiredState | None = None
    dirty_conns: set[str] = field(default_factory=set)
    sa_events: list[SaEvent] = field(default_factory=list)  # in the order they happened
    full_resync: bool = False
    waiters: list[threading.Event] = field(default_factory=list)
    stop: bool = False
    cleanup: bool = False

    def __bool__(self) -> bool:
        return bool(self.stop or self.desired or self.dirty_conns or self.full_resync or self.waiters)


class Worker:
    def __init__(self, reconciler: Reconciler, queue: WorkQueue, backend: Backend,
                 clock: Callable[[], float], event_batch: float = EVENT_BATCH) -> None:
        self._reconciler = reconciler
        self._queue = queue
        self._backend = backend
        self._clock = clock
        self._event_batch = event_batch
        self._events_due = 0.0  # events wait for a pass until then (the last pass's end + the batch)
        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    @property
    def snapshot(self) -> StatusSnapshot:
        return self._reconciler.snapshot

    # -- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._backend.start_events(self.mark_conns_dirty)

    def submit(self, desired: DesiredState) -> None:
        with self._cond:
            self._inbox.desired = desired
            self._cond.notify()

    def mark_conns_dirty(self, conn_names: frozenset[str] | None, sa_events: Sequence[SaEvent] = ()) -> None:
        """IKE daemon events: these connections changed (`sa_events` says how, for some of them);
        None: look at everything."""
        with self._cond:
            if conn_names is None:
                self._inbox.full_resync = True
            else:
                self._inbox.dirty_conns |= conn_names
            self._inbox.sa_events.extend(sa_events)
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
        seen_desired = False  # no pass before the first OVSDB snapshot: never act on an empty picture
        while True:
            with self._cond:
                while not self._ready(seen_desired):  # the wait is measured again after each wake-up
                    self._cond.wait(self._sleep_time() if seen_desired else None)
                inbox, self._inbox = self._inbox, _Inbox()
            now = self._clock()
            if inbox.stop:
                if inbox.cleanup:
                    self._reconciler.remove_everything(now)
                for waiter in inbox.waiters:
                    waiter.set()
                return
            self._reconciler.note_sa_events(inbox.sa_events)
            self._queue.add(inbox.dirty_conns)
            if inbox.full_resync:
                self._queue.request_full(now)
            seen_desired = seen_desired or inbox.desired is not None
            if seen_desired:
                run_due_work(self._reconciler, self._queue, inbox.desired, now)
                self._events_due = self._clock() + self._event_batch
            for waiter in inbox.waiters:
                waiter.set()

    def _ready(self, seen_desired: bool) -> bool:
        inbox = self._inbox
        if inbox.stop or inbox.desired or inbox.full_resync or inbox.waiters or not seen_desired:
            return bool(inbox)
        now = self._clock()
        return (bool(inbox.dirty_conns) and now >= self._events_due) or self._queue.has_work(now)

    def _sleep_time(self) -> float:
        deadline = self._queue.next_deadline()
        if self._inbox.dirty_conns:
            deadline = min(deadline, self._events_due)
        return max(0.0, deadline - self._clock()) + 0.01


def run_due_work(reconciler: Reconciler, queue: WorkQueue, desired: DesiredState | None, now: float) -> None:
    """One pass over the work due now; a pass that raises has its work requeued with backoff."""
    work = queue.take(now)
    try:
        reconciler.run_pass(desired, work, now)
    except Exception as exc:  # noqa: BLE001 - keep converging: one bug must not stop every tunnel
        reconciler.pass_failed(exc, queue.requeue(work, now), now)
