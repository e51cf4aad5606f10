"""Per-tunnel IPsec status written back to OVSDB, where OVN and operators already look.

Each IPsec tunnel's Interface row gets three keys in `external_ids`:

    ipsec_state    invalid | unprotected | pending | loaded | negotiating | established | error
    ipsec_reason   why it is invalid or in error (absent otherwise)
    ipsec_since    when it entered that state, ISO 8601 UTC (e.g. 2024-05-01T10:00:00Z)

Why `external_ids` and not `status`: ovs-vswitchd owns Interface:status and replaces the whole map
whenever it refreshes an interface, so keys of ours there would be erased (and rewritten by us, in
a loop). `external_ids` is the column the schema sets aside for other programs. ovn-controller
writes its own keys there (`ovn-installed`, `ovn-installed-ts` on VIFs; `ovn-chassis-id` on the
Port and, in newer releases, on the tunnel Interface when it creates it) and never an `ipsec_*`
key; ovs-vswitchd only reads the column.

Never fighting other writers: every write is a partial map mutation of our three keys only
(`Row.setkey` / `Row.delkey` become `mutate` operations), never a write of the whole column, so
keys written by anyone else are untouched even when they change in the same instant. A value is
written only when it differs from what the database holds. The keys go away when the tunnel is
removed (with its row), when it stops being an IPsec tunnel, and when the monitor exits with
cleanup (its connections are gone then too).

Pure core: `status_keys()` and `plan_writes()`. Adapter: `InterfaceStatusWriter`, which runs in the
main thread, the only one that touches the IDL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import ovs.db.idl
import ovs.poller

from ..status.snapshot import StatusSnapshot, TunnelStatus

log = logging.getLogger("ovs_ipsec.writer")

STATE_KEY, REASON_KEY, SINCE_KEY = "ipsec_state", "ipsec_reason", "ipsec_since"
LAST_GOOD_KEY = "ipsec_last_good_since"  # while invalid: since when the last good configuration is kept
OWNED_KEYS = (STATE_KEY, REASON_KEY, SINCE_KEY, LAST_GOOD_KEY)
COLUMN = "external_ids"


@dataclass(frozen=True)
class RowWrite:
    """The mutation one Interface row needs: keys to set and keys to delete, ours only."""

    uuid: object
    name: str
    set_keys: tuple[tuple[str, str], ...]
    delete_keys: tuple[str, ...]


def status_keys(tunnel: TunnelStatus) -> dict[str, str]:
    keys = {STATE_KEY: tunnel.state.value}
    if tunnel.reason:
        keys[REASON_KEY] = tunnel.reason
    if tunnel.since is not None:
        keys[SINCE_KEY] = _iso(tunnel.since)
    if tunnel.last_good_since is not None:
        keys[LAST_GOOD_KEY] = _iso(tunnel.last_good_since)
    return keys


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def wanted_keys(snapshot: StatusSnapshot) -> dict[str, dict[str, str]]:
    """Tunnel name -> the keys its Interface row should carry."""
    return {tunnel.name: status_keys(tunnel) for tunnel in snapshot.tunnels}


def plan_writes(wanted: Mapping[str, Mapping[str, str]],
                rows: Iterable[tuple[object, str, Mapping[str, str]]]) -> tuple[RowWrite, ...]:
    """(uuid, name, external_ids) of every Interface row -> the mutations that make ours right.

    A row whose name has no status (not an IPsec tunnel, or not any more) loses our keys. Several
    rows may briefly share a name (ovn-controller replaces a row when a tunnel's options change);
    each gets the same keys.
    """
    writes = []
    for uuid, name, external_ids in rows:
        target = wanted.get(name, {})
        current = {key: external_ids[key] for key in OWNED_KEYS if key in external_ids}
        if current == target:
            continue
        writes.append(RowWrite(
            uuid, name,
            set_keys=tuple((key, value) for key, value in target.items() if current.get(key) != value),
            delete_keys=tuple(key for key in current if key not in target)))
    return tuple(writes)


class InterfaceStatusWriter:
    """Keeps our external_ids keys equal to the last published status; main thread only.

    `run()` is called on every main-loop iteration. It does nothing unless a new snapshot was
    published or the database changed since it last looked, and it keeps at most one transaction
    in flight: a newer status simply waits for the current write to finish, then is compared again.
    """

    def __init__(self, idl: ovs.db.idl.Idl) -> None:
        self._idl = idl
        self._txn: ovs.db.idl.Transaction | None = None
        self._looked_at: tuple[StatusSnapshot, int] | None = None
        self._wanted: dict[str, dict[str, str]] = {}  # what the last look asked for, per tunnel
        self._names: dict = {}  # Interface uuid -> name, kept for the rows the IDL reported touched
        self._last_full_resync: float | None = None
        self._full_scan = True  # look at every row: first run, after a failed write, on a resync
        self.writes = 0  # transactions committed, for tests and debugging

    def run(self, snapshot: StatusSnapshot) -> None:
        if self._txn is not None and not self._finish_commit():
            return
        if snapshot.taken_at is None or not self._idl.has_ever_connected():
            # Before the first status, an empty one would erase what the previous run wrote and
            # that is still true (connections survive `exit --no-cleanup`).
            return
        if self._looked_at is not None and self._looked_at[0] is snapshot \
                and self._looked_at[1] == self._idl.change_seqno:
            return
        self._looked_at = (snapshot, self._idl.change_seqno)
        wanted = wanted_keys(snapshot)
        if snapshot.reconcile.last_full_resync != self._last_full_resync:
            # The daemon's periodic full look: also repair keys changed behind our back.
            self._last_full_resync, self._full_scan = snapshot.reconcile.last_full_resync, True
        writes = plan_writes(wanted, self._rows_to_check(wanted))
        self._wanted = wanted
        if writes:
            self._txn = self._start(writes)
            self._finish_commit()

    def _rows_to_check(self, wanted: Mapping[str, Mapping[str, str]]) -> list[tuple[object, str, Mapping[str, str]]]:
        """Only rows the IDL saw change and rows of tunnels whose status changed: reading every
        row through the IDL's accessors would make a one-tunnel change cost O(N) in this thread."""
        rows = self._idl.tables["Interface"].rows
        touched, self._idl.touched_interfaces = self._idl.touched_interfaces, set()
        if self._full_scan:
            self._full_scan = False
            self._names = {uuid: row.name for uuid, row in rows.items()}
            return list(self._rows())
        for uuid in touched:
            row = rows.get(uuid)
            if row is None:
                self._names.pop(uuid, None)
            else:
                self._names[uuid] = row.name
        changed = {name for name in wanted.keys() | self._wanted.keys() if wanted.get(name) != self._wanted.get(name)}
        uuids = touched | {uuid for uuid, name in self._names.items() if name in changed}
        return [(uuid, rows[uuid].name, rows[uuid].external_ids) for uuid in uuids if uuid in rows]

    def wait(self, poller: ovs.poller.Poller) -> None:
        if self._txn is not None:
            self._txn.wait(poller)

    def clear(self, timeout: float = 3.0) -> None:
        """Remove our keys from every row (the monitor exits and takes its connections along)."""
        if not self._idl.has_ever_connected():
            return
        deadline = time.monotonic() + timeout
        while self._txn is not None and not self._finish_commit() and time.monotonic() < deadline:
            self._block(deadline)
        writes = plan_writes({}, self._rows())
        if not writes:
            return
        self._txn = self._start(writes)
        while not self._finish_commit() and time.monotonic() < deadline:
            self._block(deadline)

    # -- IDL plumbing ----------------------------------------------------------------------------

    def _rows(self) -> Iterable[tuple[object, str, Mapping[str, str]]]:
        for uuid, row in self._idl.tables["Interface"].rows.items():
            yield uuid, row.name, row.external_ids

    def _start(self, writes: tuple[RowWrite, ...]) -> ovs.db.idl.Transaction:
        txn = ovs.db.idl.Transaction(self._idl)
        txn.add_comment("ovs-monitor-ipsec: tunnel IPsec status")
        rows = self._idl.tables["Interface"].rows
        for write in writes:
            row = rows.get(write.uuid)
            if row is None:
                continue
            for key in write.delete_keys:
                row.delkey(COLUMN, key)
            for key, value in write.set_keys:
                row.setkey(COLUMN, key, value)  # a delete-then-insert of this key only
        log.debug("writing IPsec status to %s", ", ".join(sorted({w.name for w in writes})))
        return txn

    def _finish_commit(self) -> bool:
        """Advance the transaction in flight; true once there is none."""
        assert self._txn is not None
        status = self._txn.commit()
        if status == ovs.db.idl.Transaction.INCOMPLETE:
            return False
        if status in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.UNCHANGED):
            self.writes += status == ovs.db.idl.Transaction.SUCCESS
        else:
            # TRY_AGAIN (the connection dropped) or an error: look again on the next run.
            log.debug("status write ended with %s; will compare again", status)
            self._looked_at = None
            self._full_scan = True
        self._txn = None
        return True

    def _block(self, deadline: float) -> None:
        self._idl.run()
        poller = ovs.poller.Poller()
        self._idl.wait(poller)
        self.wait(poller)
        poller.timer_wait(max(0, int((deadline - time.monotonic()) * 1000)))
        poller.block()
