"""The OVSDB reader against a real ovsdb-server: each snapshot says which rows changed, and only those
are new objects; a reconnection that missed deletions is caught."""

from __future__ import annotations

import time

import pytest

from testsupport.ovsdb import Ovsdb
from ovs_ipsec.model import ChangeLog
from ovs_ipsec.ovsdb.reader import OvsdbReader


@pytest.fixture
def db(tmp_path):
    server = Ovsdb(tmp_path)
    server.start()
    yield server
    server.stop()


def next_snapshot(reader: OvsdbReader, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reader.run():
            return reader.snapshot()
        time.sleep(0.01)
    raise AssertionError("no new snapshot")


def add(db: Ovsdb, *names: str) -> None:
    args = []
    for name in names:
        args += ["--", "add-port", "br-ipsec", name, "--", "set", "interface", name, "type=geneve",
                 f"options:remote_ip=10.0.0.{len(name)}", "options:psk=x"]
    db.vsctl(*args)


def by_name(snapshot) -> dict:
    return {row.name: (uuid, row) for uuid, row in snapshot.interfaces.items()}


def test_a_snapshot_names_the_rows_that_changed_and_reuses_the_others(db):
    reader = OvsdbReader(db.remote)
    try:
        add(db, "a", "b", "c")
        first = next_snapshot(reader)
        while len(first.interfaces) < 4:
            first = next_snapshot(reader)
        rows = by_name(first)
        db.vsctl("set", "interface", "b", "options:psk=y")
        add(db, "d")
        db.vsctl("del-port", "c")
        second = next_snapshot(reader)
        while "d" not in by_name(second) or "c" in by_name(second):
            second = next_snapshot(reader)
        after = by_name(second)
        assert second.changes.since(first.changes) == {rows["b"][0], rows["c"][0], after["d"][0]}
        assert after["a"][1] is rows["a"][1]  # unchanged: the very same object
        assert after["b"][1].option("psk") == "y" and rows["b"][1].option("psk") == "x"  # old snapshot intact
        assert set(after) == {"a", "b", "d", "br-ipsec"}  # the bridge has an internal Interface too
        assert second.changes.since(ChangeLog()) is None  # another producer: compare everything
    finally:
        reader.close()


def test_rows_deleted_while_disconnected_are_noticed(db):
    reader = OvsdbReader(db.remote)
    try:
        add(db, "a", "b")
        snapshot = next_snapshot(reader)
        while len(snapshot.interfaces) < 3:
            snapshot = next_snapshot(reader)
        uuids = {row.name: uuid for uuid, row in snapshot.interfaces.items()}
        db.stop()
        # Another database where the reader left off (a restored backup, say): only a new "a".
        (db.workdir / "conf.db").unlink()
        db.start()
        add(db, "a")
        later = next_snapshot(reader, timeout=15)
        while {row.name for row in later.interfaces.values()} != {"a", "br-ipsec"}:
            later = next_snapshot(reader, timeout=15)
        assert {uuids["a"], uuids["b"]} <= later.changes.since(snapshot.changes)
        assert not {uuids["a"], uuids["b"]} & later.interfaces.keys()
    finally:
        reader.close()


def test_only_netdev_bridges_and_their_ports_are_replicated_and_never_half(db):
    """A kernel-datapath host's Bridge and Port rows stay on the server (monitor_cond); a bridge
    turned netdev has its ports asked for, and no snapshot shows its tunnel on the kernel's
    datapath meanwhile (that snapshot would load it into the IKE daemon)."""
    reader = OvsdbReader(db.remote)
    seen: list[dict] = []

    def settle(expected: dict) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if reader.run():
                seen.append({row.name: row.datapath_type for row in reader.snapshot().interfaces.values()})
                if seen[-1] == expected:
                    return
            time.sleep(0.01)
        raise AssertionError(f"never {expected}: {seen}")

    try:
        add(db, "k1")
        db.vsctl("add-br", "br-n", "--", "set", "bridge", "br-n", "datapath_type=netdev",
                 "--", "add-port", "br-n", "n1", "--", "set", "interface", "n1", "type=geneve",
                 "options:remote_ip=10.0.0.9", "options:psk=x")
        settle({"br-ipsec": None, "k1": None, "br-n": "netdev", "n1": "netdev"})
        assert [row.datapath_type for row in reader.idl.tables["Bridge"].rows.values()] == ["netdev"]
        assert len(reader.idl.tables["Port"].rows) == 2  # br-n's own port and n1's
        assert all(snapshot["n1"] == "netdev" for snapshot in seen if "n1" in snapshot)

        seen.clear()
        db.vsctl("set", "bridge", "br-ipsec", "datapath_type=netdev")
        settle({"br-ipsec": "netdev", "k1": "netdev", "br-n": "netdev", "n1": "netdev"})
        assert all(snapshot["k1"] == "netdev" for snapshot in seen)  # never half: no kernel k1 first
        db.vsctl("set", "bridge", "br-n", "datapath_type=system")
        settle({"br-ipsec": "netdev", "k1": "netdev", "br-n": None, "n1": None})
        assert len(reader.idl.tables["Port"].rows) == 2  # br-n's ports dropped from the replica
    finally:
        reader.close()
