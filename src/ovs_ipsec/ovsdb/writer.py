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

Never fighting other writers: every write is a partial map mutation of our keys only (an OVSDB
`mutate`: `delete` of the keys, then `insert` of their new values, where `_uuid` is the row), never
a write of the whole column, so keys written by anyone else are untouched even when they change in
the same instant. A value is written only when it differs from what the row holds. The keys go
away when the tunnel is removed (with its row), when it stops being an IPsec tunnel, and when the
monitor exits with cleanup (its connections are gone then too).

The IDL does not replicate `external_ids` (ovsdb/reader.py): at 5000 tunnels the column and the
echo of every write cost the replica megabytes, for keys we wrote ourselves. The writer remembers
what it wrote, and reads our keys from the server (one `select`) only when it cannot know them: at
start (a previous run's keys), after a failed write or a reconnection, and at each full resync
(keys someone else changed are put right then, not at once as when the column was replicated).
It has its own JSON-RPC session, since python-ovs transactions need the column replicated.

Pure core: `status_keys()`, `plan_writes()`, `mutate_op()`, `owned_keys_from_select()`. Adapter:
`InterfaceStatusWriter`, which runs in the main thread, the only one that touches the IDL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import ovs.db.idl
import ovs.jsonrpc
import ovs.poller

from ..index import add_member, discard_member
from ..model import ChangeLog
from ..status.snapshot import StatusSnapshot, TunnelStatus

log = logging.getLogger("ovs_ipsec.writer")

# Rows per transaction. A bulk change writes thousands of rows: in one transaction the request
# and ovsdb-server's echo of every row are each built whole in memory (at N=10,000 the write-back
# raised the peak RSS by 26 MB, 13 MB of it transient); in chunks the same memory serves chunk
# after chunk (+6 MB), for 0.2 s more until the last row is written.
WRITE_CHUNK = 1000

STATE_KEY, REASON_KEY, SINCE_KEY = "ipsec_state", "ipsec_reason", "ipsec_since"
LAST_GOOD_KEY = "ipsec_last_good_since"  # while invalid: since when the last good configuration is kept
OWNED_KEYS = (STATE_KEY, REASON_KEY, SINCE_KEY, LAST_GOOD_KEY)
COLUMN = "external_ids"
COMMENT = "ovs-monitor-ipsec: tunnel IPsec status"  # in ovsdb-server's log, as upstream's writes


@dataclass(frozen=True)
class RowWrite:
    """The mutation one Interface row needs: keys to set and keys to delete, ours only."""

    uuid: object
    name: str
    set_keys: tuple[tuple[str, str], ...]
    delete_keys: tuple[str, ...]


def status_keys(tunnel: TunnelStatus, iso: Callable[[float], str] | None = None) -> dict[str, str]:
    iso = iso or _iso
    keys = {STATE_KEY: tunnel.state.value}
    if tunnel.reason:
        keys[REASON_KEY] = tunnel.reason
    if tunnel.since is not None:
        keys[SINCE_KEY] = iso(tunnel.since)
    if tunnel.last_good_since is not None:
        keys[LAST_GOOD_KEY] = iso(tunnel.last_good_since)
    return keys


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def wanted_keys(snapshot: StatusSnapshot, iso: Callable[[float], str] | None = None) -> dict[str, dict[str, str]]:
    """Tunnel name -> the keys its Interface row should carry."""
    return {name: status_keys(tunnel, iso) for name, tunnel in snapshot.statuses.items()}


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


def mutate_op(write: RowWrite) -> dict:
    """The OVSDB operation for one row: drop the keys it deletes or sets, insert the new values.
    Mutations apply in order, so this is `Row.setkey`/`delkey` as one operation; a row deleted
    meanwhile matches nothing (count 0), which is no error."""
    drop = list(write.delete_keys) + [key for key, _ in write.set_keys]
    mutations: list = [[COLUMN, "delete", ["set", drop]]]
    if write.set_keys:
        mutations.append([COLUMN, "insert", ["map", [[key, value] for key, value in write.set_keys]]])
    return {"op": "mutate", "table": "Interface", "where": [["_uuid", "==", ["uuid", str(write.uuid)]]],
            "mutations": mutations}


def clear_op() -> dict:
    """Our keys off every row, in one operation (the monitor exits with cleanup)."""
    return {"op": "mutate", "table": "Interface", "where": [],
            "mutations": [[COLUMN, "delete", ["set", list(OWNED_KEYS)]]]}


def select_op(uuid: object) -> dict:
    """One row's external_ids. A row at a time, in chunks, rather than one select of the table:
    the reply is parsed whole, and at 5000 rows that one reply made 4 MB of objects at once."""
    return {"op": "select", "table": "Interface", "where": [["_uuid", "==", ["uuid", str(uuid)]]],
            "columns": [COLUMN]}


def owned_keys_from_select(uuids: Iterable[object], result: object) -> dict[object, dict[str, str]]:
    """The reply to `select_op` of each of `uuids` -> our keys each row holds (rows without any,
    or gone, left out). Other writers' keys are dropped here; what is kept is only ever compared
    with what we want, never used. Raises ValueError when the reply is not what a select answers."""
    try:
        held = {}
        for uuid, reply in zip(uuids, result, strict=True):  # type: ignore[call-overload]
            for row in reply["rows"]:
                kind, pairs = row[COLUMN]
                ours = {key: value for key, value in (pairs if kind == "map" else [])
                        if key in OWNED_KEYS and isinstance(value, str)}
                if ours:
                    held[uuid] = ours
        return held
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"unexpected select reply: {type(exc).__name__}") from exc


class InterfaceStatusWriter:
    """Keeps our external_ids keys equal to the last published status; main thread only.

    `run()` is called on every main-loop iteration. It does nothing unless a new snapshot was
    published or the database changed since it last looked, and it keeps at most one request in
    flight: a newer status simply waits for the current write to finish, then is compared again.
    """

    def __init__(self, idl: ovs.db.idl.Idl, remote: str, chunk: int = WRITE_CHUNK) -> None:
        self._idl = idl
        self._session = ovs.jsonrpc.Session.open(remote)
        self._session_seqno = self._session.get_seqno()
        self._chunk = chunk
        # The request in flight: its id, and the rows it writes (uuid, keys after it) or reads.
        self._pending: tuple[object, tuple[tuple[object, Mapping[str, str]], ...] | None] | None = None
        self._reading: tuple = ()  # the rows a read in flight asks for
        # Our keys as each row holds them (rows with none left out), as read or written by us;
        # None: not known, read them first. The values are `_wanted`'s own dicts where they match.
        self._held: dict | None = None
        self._to_read: list = []  # rows whose keys are still to be read into `_read_so_far`
        self._read_so_far: dict | None = None
        self._looked_at: tuple[StatusSnapshot, int] | None = None
        self._wanted: dict[str, dict[str, str]] = {}  # what the last look asked for, per tunnel
        self._seen_changes: ChangeLog | None = None  # the ChangeLog of the snapshot `_wanted` is from
        self._names: dict = {}  # Interface uuid -> name, kept for the rows the IDL reported touched
        self._uuids_of: dict[str, tuple] = {}  # the reverse: name -> uuids (see index.py)
        self._iso_of: dict[int, str] = {}  # see `_shared_iso`
        self._last_full_resync: float | None = None
        self._full_scan = True  # look at every row: first run, after a failed write, on a resync
        self._backlog: tuple[RowWrite, ...] = ()  # planned for `_backlog_of`, beyond the first chunk
        self._backlog_of: StatusSnapshot | None = None
        self.writes = 0  # transactions committed, for tests and debugging

    def run(self, snapshot: StatusSnapshot) -> None:
        self._pump()
        if self._pending is not None:
            return
        if self._backlog:
            if snapshot is self._backlog_of:
                self._write(self._backlog, snapshot)
                return
            # A newer status: compare every row with it instead of writing what is left.
            self._backlog, self._full_scan = (), True
        if snapshot.taken_at is None or not self._idl.has_ever_connected() or not self._session.is_connected():
            # Before the first status, an empty one would erase what the previous run wrote and
            # that is still true (connections survive `exit --no-cleanup`).
            return
        if self._looked_at is not None and self._looked_at[0] is snapshot \
                and self._looked_at[1] == self._idl.change_seqno:
            return
        self._looked_at = (snapshot, self._idl.change_seqno)
        if snapshot.reconcile.last_full_resync != self._last_full_resync:
            # The daemon's periodic full look: also repair keys changed behind our back.
            self._last_full_resync, self._full_scan, self._held = snapshot.reconcile.last_full_resync, True, None
        if self._held is None:
            self._full_scan = True
            self._read_next()
            return
        changed = self._update_wanted(snapshot)
        writes = plan_writes(self._wanted, self._rows_to_check(changed))
        if writes:
            self._write(writes, snapshot)

    def _write(self, writes: tuple[RowWrite, ...], snapshot: StatusSnapshot) -> None:
        """Send the first `chunk` rows; keep the rest for the next runs."""
        self._backlog, self._backlog_of = writes[self._chunk:], snapshot
        first = writes[:self._chunk]
        log.debug("writing IPsec status to %s", ", ".join(sorted({w.name for w in first})))
        self._send([mutate_op(w) for w in first] + [{"op": "comment", "comment": COMMENT}],
                   tuple((w.uuid, self._wanted.get(w.name, {})) for w in first))

    def _update_wanted(self, snapshot: StatusSnapshot) -> set[str] | None:
        """Bring `_wanted` to this snapshot, looking only at the tunnels whose status changed
        since the last look when the snapshot says which; return the names whose keys changed
        (None: look at every row)."""
        names = None if self._full_scan else snapshot.changes.since(self._seen_changes)
        self._seen_changes = snapshot.changes
        if names is None:
            before, self._wanted = self._wanted, wanted_keys(snapshot, self._shared_iso)
            if self._full_scan:
                return None
            return {name for name in before.keys() | self._wanted.keys()
                    if before.get(name) != self._wanted.get(name)}
        changed = set()
        for name in names:
            status = snapshot.statuses.get(name)
            keys = status_keys(status, self._shared_iso) if status is not None else None
            if keys != self._wanted.get(name):
                changed.add(name)
                if keys is None:
                    del self._wanted[name]
                else:
                    self._wanted[name] = keys
        return changed

    def _shared_iso(self, moment: float) -> str:
        """One string per second written: a bulk load's thousands of tunnels change state within
        the same few seconds, and each kept its own copy (0.3 MB at 5000 tunnels). Bounded: the
        memo is dropped when it grows, and the strings live on in `_wanted` as long as needed."""
        second = int(moment)  # what _iso shows of it
        text = self._iso_of.get(second)
        if text is None:
            if len(self._iso_of) > 256:
                self._iso_of = {}
            text = self._iso_of[second] = _iso(moment)
        return text

    def _rows_to_check(self, changed: set[str] | None) -> list[tuple[object, str, Mapping[str, str]]]:
        """Only rows the IDL saw change and rows of tunnels whose status changed (None: every
        row): reading every row through the IDL's accessors would make a one-tunnel change cost
        O(N) in this thread."""
        assert self._held is not None
        held = self._held
        rows = self._idl.tables["Interface"].rows
        touched, self._idl.touched_interfaces = self._idl.touched_interfaces, set()
        if changed is None:
            self._full_scan = False
            self._names = {uuid: row.name for uuid, row in rows.items()}
            self._uuids_of = {}
            for uuid, name in self._names.items():
                add_member(self._uuids_of, name, uuid)
            for uuid in [uuid for uuid in held if uuid not in rows]:
                del held[uuid]
            for uuid, name in self._names.items():  # share the dicts of rows already right
                if uuid in held and held[uuid] == self._wanted.get(name):
                    held[uuid] = self._wanted[name]
            return [(uuid, name, held.get(uuid, {})) for uuid, name in self._names.items()]
        for uuid in touched:
            row = rows.get(uuid)
            old = self._names.pop(uuid, None)
            if old is not None:
                discard_member(self._uuids_of, old, uuid)
            if row is not None:
                self._names[uuid] = row.name
                add_member(self._uuids_of, row.name, uuid)
            else:
                held.pop(uuid, None)
        uuids = set(touched)
        for name in changed:
            uuids.update(self._uuids_of.get(name, ()))
        return [(uuid, self._names[uuid], held.get(uuid, {})) for uuid in uuids if uuid in self._names]

    def wait(self, poller: ovs.poller.Poller) -> None:
        self._session.wait(poller)
        self._session.recv_wait(poller)

    def clear(self, timeout: float = 3.0) -> None:
        """Remove our keys from every row (the monitor exits and takes its connections along)."""
        if not self._idl.has_ever_connected():
            return
        deadline = time.monotonic() + timeout
        # No need to wait for a request in flight: the server answers a session's requests in
        # order, so a write in flight lands before the clear; its reply is simply not awaited.
        self._backlog, self._read_so_far, self._to_read = (), None, []
        while not self._session.is_connected() and time.monotonic() < deadline:
            self._block(deadline)
        self._send([clear_op(), {"op": "comment", "comment": COMMENT}], ())
        while self._pending is not None and time.monotonic() < deadline:
            self._block(deadline)

    def close(self) -> None:
        self._session.close()

    # -- JSON-RPC plumbing -------------------------------------------------------------------------

    def _send(self, ops: list, rows: tuple[tuple[object, Mapping[str, str]], ...] | None) -> None:
        request = ovs.jsonrpc.Message.create_request("transact", ["Open_vSwitch", *ops])
        if self._session.send(request):
            self._failed("the request could not be sent")
            return
        self._pending = (request.id, rows)

    def _pump(self) -> None:
        """Run the session and take in the reply to the request in flight, if it came."""
        self._session.run()
        if self._session.get_seqno() != self._session_seqno:
            # Connected again (or lost): whatever was in flight may or may not have happened.
            self._session_seqno = self._session.get_seqno()
            if self._pending is not None or self._held is not None:
                self._failed("the connection to the database was reset")
        while (message := self._session.recv()) is not None:
            if self._pending is None or message.id != self._pending[0]:
                continue
            rows = self._pending[1]
            self._pending = None
            if message.type != ovs.jsonrpc.Message.T_REPLY or not isinstance(message.result, list):
                self._failed("the database refused the request")
            elif rows is None:
                self._read(message.result)
            else:
                self._written(message.result, rows)

    def _read_next(self) -> None:
        """Ask for the keys of the next chunk of rows; once all are in, they are `_held`."""
        if self._read_so_far is None:
            self._read_so_far, self._to_read = {}, list(self._idl.tables["Interface"].rows)
        if not self._to_read:
            self._held, self._read_so_far = self._read_so_far, None
            self._looked_at = None  # look again now that the rows' keys are known
            return
        self._reading, self._to_read = tuple(self._to_read[:self._chunk]), self._to_read[self._chunk:]
        self._send([select_op(uuid) for uuid in self._reading], None)

    def _read(self, result: list) -> None:
        if self._read_so_far is None:
            return  # a read given up (`clear`)
        try:
            self._read_so_far.update(owned_keys_from_select(self._reading, result))
        except ValueError as exc:
            self._failed(str(exc))
            return
        self._read_next()

    def _written(self, result: list, rows: tuple[tuple[object, Mapping[str, str]], ...]) -> None:
        if any(not isinstance(op, dict) or "error" in op for op in result):
            self._failed("the write failed")
            return
        self.writes += 1
        if self._held is None:
            return
        for (uuid, keys), op in zip(rows, result, strict=False):
            if keys and op.get("count") == 1:
                self._held[uuid] = keys
            else:  # keys removed, or the row is gone
                self._held.pop(uuid, None)

    def _failed(self, why: str) -> None:
        """Compare every row again, with our keys read afresh, on the next run."""
        log.debug("status write-back: %s; will read and compare again", why)
        self._pending = None
        self._held = self._read_so_far = None
        self._looked_at = None
        self._full_scan = True
        self._backlog = ()

    def _block(self, deadline: float) -> None:
        self._pump()
        poller = ovs.poller.Poller()
        self.wait(poller)
        poller.timer_wait(max(0, int((deadline - time.monotonic()) * 1000)))
        poller.block()
