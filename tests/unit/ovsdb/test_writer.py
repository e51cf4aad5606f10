"""The status write-back plan: our three keys only, written only when they differ."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import pytest

from ovs_ipsec.model import ChangeLog, GlobalConfig, TunnelState
from ovs_ipsec.ovsdb.reader import OvsdbReader
from ovs_ipsec.ovsdb.writer import OWNED_KEYS, InterfaceStatusWriter, RowWrite, plan_writes, status_keys
from ovs_ipsec.status.snapshot import ReconcileStats, StatusSnapshot, TunnelStatus


def status(name="gnv0", state=TunnelState.ESTABLISHED, reason=None, since=86400.0):
    return TunnelStatus(name=name, type="geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", auth="psk",
                        state=state, reason=reason, since=since)


def test_status_keys():
    assert status_keys(status()) == {"ipsec_state": "established", "ipsec_since": "1970-01-02T00:00:00Z"}
    assert status_keys(status(state=TunnelState.INVALID, reason="'psk' is empty"))["ipsec_reason"] == "'psk' is empty"


def test_only_differences_are_written_and_foreign_keys_never_appear():
    wanted = {"gnv0": status_keys(status()), "gre0": status_keys(status("gre0", TunnelState.ERROR, "refused"))}
    foreign = {"ovn-chassis-id": "ch2@10.0.0.2", "ipsec_custom": "operator's own"}
    rows = [
        ("u1", "gnv0", {**foreign, **wanted["gnv0"]}),  # already right: nothing to do
        ("u2", "gre0", {**foreign, "ipsec_state": "loaded", "ipsec_since": wanted["gre0"]["ipsec_since"]}),
        ("u3", "vif0", {**foreign, "iface-id": "lsp1"}),  # not ours, never was
        ("u4", "old0", {**foreign, "ipsec_state": "established", "ipsec_reason": "x", "ipsec_since": "y"}),
    ]
    assert plan_writes(wanted, rows) == (
        RowWrite("u2", "gre0", set_keys=(("ipsec_state", "error"), ("ipsec_reason", "refused")), delete_keys=()),
        RowWrite("u4", "old0", set_keys=(), delete_keys=("ipsec_state", "ipsec_reason", "ipsec_since")),
    )
    for write in plan_writes(wanted, rows):
        assert {key for key, _ in write.set_keys} | set(write.delete_keys) <= set(OWNED_KEYS)


def test_a_reason_that_clears_is_deleted():
    wanted = {"gnv0": status_keys(status())}
    rows = [("u1", "gnv0", {**wanted["gnv0"], "ipsec_reason": "was broken"})]
    assert plan_writes(wanted, rows) == (RowWrite("u1", "gnv0", (), ("ipsec_reason",)),)


def test_rows_sharing_a_name_each_get_the_keys():
    wanted = {"ovn-ch2-0": status_keys(status("ovn-ch2-0"))}
    writes = plan_writes(wanted, [("old", "ovn-ch2-0", {}), ("new", "ovn-ch2-0", {})])
    assert [w.uuid for w in writes] == ["old", "new"]


def test_a_row_write_is_one_mutate_of_our_keys_and_a_read_keeps_only_ours():
    from ovs_ipsec.ovsdb.writer import mutate_op, owned_keys_from_select

    op = mutate_op(RowWrite("6a2f0d6e-0000-4000-8000-000000000001", "gre0",
                            set_keys=(("ipsec_state", "error"),), delete_keys=("ipsec_reason",)))
    assert op["where"] == [["_uuid", "==", ["uuid", "6a2f0d6e-0000-4000-8000-000000000001"]]]
    assert op["mutations"] == [["external_ids", "delete", ["set", ["ipsec_reason", "ipsec_state"]]],
                               ["external_ids", "insert", ["map", [["ipsec_state", "error"]]]]]
    reply = [{"rows": [{"external_ids": ["map", [["ipsec_state", "loaded"], ["ovn-chassis-id", "ch2"]]]}]},
             {"rows": [{"external_ids": ["map", [["iface-id", "lsp1"]]]}]},
             {"rows": []}]  # deleted meanwhile
    assert owned_keys_from_select(["u1", "u2", "u3"], reply) == {"u1": {"ipsec_state": "loaded"}}
    for hostile in ([{"rows": [{"external_ids": 5}]}], [{"error": "x"}], None, [{"rows": [{}]}]):
        with pytest.raises(ValueError):
            owned_keys_from_select(["u1"], hostile)


# -- against a real ovsdb-server: the incremental write-back ends where a full one would ---------

@contextlib.contextmanager
def _server_with_tunnels(tmp_path, *names):
    """A real ovsdb-server with one Geneve tunnel per name, our reader on it, and `ids(name)`: that
    row's external_ids as the server holds them."""
    from testsupport.ovsdb import Ovsdb

    db = Ovsdb(tmp_path)
    db.start()
    reader = OvsdbReader(db.remote)
    try:
        for name in names:
            db.vsctl("add-port", "br-ipsec", name, "--", "set", "interface", name, "type=geneve",
                     "options:remote_ip=10.0.0.2", "options:psk=x")

        def ids(name):
            table = json.loads(db.vsctl("--format=json", "--columns=external_ids", "list", "interface", name))
            return dict(table["data"][0][0][1])

        yield db, reader, ids
    finally:
        reader.close()
        db.stop()


def _ours(external_ids: dict) -> dict:
    return {key: value for key, value in external_ids.items() if key in OWNED_KEYS}


def _pump(reader, writer, snapshot, until, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reader.run()
        writer.run(snapshot)
        if until():
            return
        time.sleep(0.01)
    raise AssertionError("the write-back did not converge")


def test_only_changed_statuses_are_written_and_the_result_is_a_full_write_back(tmp_path):
    with _server_with_tunnels(tmp_path, "a", "b", "c") as (db, reader, ids):
        def ours(name):
            return _ours(ids(name))

        writer = InterfaceStatusWriter(reader.idl, reader.remote)
        log = ChangeLog.start()
        statuses = {n: status(n, TunnelState.LOADED, since=1000.0) for n in "abc"}
        log = log.advance(statuses.keys())
        first = StatusSnapshot(statuses, GlobalConfig(), None, 1000.0, changes=log)
        _pump(reader, writer, first, lambda: all(ours(n) == status_keys(statuses[n]) for n in "abc"))

        # b fails, c stops being an IPsec tunnel; a is not looked at (nor rewritten)
        statuses = {"a": statuses["a"], "b": status("b", TunnelState.ERROR, "refused", since=1010.0)}
        log = log.advance({"b", "c"})
        second = StatusSnapshot(statuses, GlobalConfig(), None, 1010.0, changes=log)
        writes = writer.writes
        _pump(reader, writer, second, lambda: ours("b") == status_keys(statuses["b"]) and ours("c") == {})
        assert writer.writes == writes + 1 and ours("a") == status_keys(statuses["a"])

        # someone else edits our key on a: put right at the next full resync, which reads our
        # keys afresh (the replica has no external_ids); their own key on a is left alone
        db.vsctl("set", "interface", "a", "external_ids:ipsec_state=established", "external_ids:owner=them")
        resynced = dataclasses.replace(second, reconcile=ReconcileStats(last_full_resync=1020.0))
        _pump(reader, writer, resynced, lambda: ours("a") == status_keys(statuses["a"]))
        assert db.vsctl("get", "interface", "a", "external_ids:owner").strip().strip('"') == "them"

        # a fresh writer comparing every row finds nothing to write
        fresh = InterfaceStatusWriter(reader.idl, reader.remote)
        reader.run()
        _pump(reader, fresh, second, lambda: fresh._held is not None and fresh._pending is None)
        assert fresh.writes == 0
        fresh.close()

        # the monitor leaves with cleanup: our keys go from every row, theirs stay
        writer.clear()
        assert all(ours(n) == {} for n in "abc")
        assert db.vsctl("get", "interface", "a", "external_ids:owner").strip().strip('"') == "them"
        writer.close()


def test_a_restart_removes_stale_keys_and_a_row_deleted_meanwhile_is_no_error(tmp_path):
    with _server_with_tunnels(tmp_path, "a", "b", "gone") as (db, reader, ids):
        # What a previous run left: b is no tunnel of ours any more; a's state is stale. Next to
        # them, keys of other writers.
        db.vsctl("set", "interface", "a", "external_ids:ipsec_state=established", "external_ids:ipsec_reason=old",
                 "external_ids:ovn-chassis-id=ch2")
        db.vsctl("set", "interface", "b", "external_ids:ipsec_state=error", "external_ids:ipsec_since=x",
                 "external_ids:iface-id=lsp1")
        writer = InterfaceStatusWriter(reader.idl, reader.remote)
        statuses = {n: status(n, TunnelState.LOADED, since=1000.0) for n in ("a", "gone")}
        snapshot = StatusSnapshot(statuses, GlobalConfig(), None, 1000.0,
                                  changes=ChangeLog.start().advance(statuses.keys()))
        # "gone" is deleted after the IDL saw it and before the write reaches the server: the
        # writer (whose IDL is not run meanwhile) writes to a row that is no more
        deadline = time.monotonic() + 5
        while not any(row.name == "gone" for row in reader.idl.tables["Interface"].rows.values()) \
                and time.monotonic() < deadline:
            reader.run()
            time.sleep(0.01)
        db.vsctl("del-port", "br-ipsec", "gone")
        while writer.writes == 0 and time.monotonic() < deadline:
            writer.run(snapshot)
            time.sleep(0.01)
        assert writer.writes == 1 and writer._held is not None
        # the IDL still has the row: the write went to a row the server no longer held
        assert any(row.name == "gone" for row in reader.idl.tables["Interface"].rows.values())
        _pump(reader, writer, snapshot,
              lambda: ids("a") == {"ovn-chassis-id": "ch2", **status_keys(statuses["a"])}
              and ids("b") == {"iface-id": "lsp1"})
        writer.close()


def test_a_bulk_write_back_goes_in_chunks_and_a_newer_status_replaces_what_is_left(tmp_path):
    names = [f"t{i}" for i in range(5)]
    with _server_with_tunnels(tmp_path, *names) as (_db, reader, ids):
        def ours():
            return {name: _ours(ids(name)) for name in names}

        writer = InterfaceStatusWriter(reader.idl, reader.remote, chunk=2)
        log = ChangeLog.start()
        statuses = {n: status(n, TunnelState.LOADED, since=1000.0) for n in names}
        log = log.advance(statuses.keys())
        first = StatusSnapshot(statuses, GlobalConfig(), None, 1000.0, changes=log)
        _pump(reader, writer, first, lambda: writer.writes == 3)  # 2 + 2 + 1 rows
        assert ours() == {n: status_keys(statuses[n]) for n in names}

        # A newer status while a chunked write is under way: what was left is not written, the
        # newer status is, for every row.
        statuses = {n: status(n, TunnelState.NEGOTIATING, since=1010.0) for n in names}
        log = log.advance(statuses.keys())
        second = StatusSnapshot(statuses, GlobalConfig(), None, 1010.0, changes=log)
        while writer.writes == 3:
            reader.run()
            writer.run(second)
            time.sleep(0.01)
        statuses = {n: status(n, TunnelState.ERROR, "refused", since=1020.0) for n in names}
        log = log.advance(statuses.keys())
        third = StatusSnapshot(statuses, GlobalConfig(), None, 1020.0, changes=log)
        _pump(reader, writer, third, lambda: ours() == {n: status_keys(statuses[n]) for n in names})
