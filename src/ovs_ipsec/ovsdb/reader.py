"""The OVSDB adapter: a read-only IDL on the columns we use, and its snapshot as a DesiredState.

The IDL lives in the main thread only (python-ovs is not thread safe); what leaves this module is
frozen values. Rows are converted once and cached by UUID, so a change to one Interface among
thousands costs one conversion, not thousands, and each snapshot says which rows changed.
"""

from __future__ import annotations

import json
import socket
import sys
import types

import ovs.db.idl
import ovs.poller

from ..errors import OvsIpsecError
from ..model import USERSPACE_DATAPATH, ChangeLog, DesiredState, GlobalConfig, InterfaceRow, TunnelType

# Not external_ids, where the status writer (ovsdb/writer.py) keeps our keys: it remembers what it
# wrote rather than have the replica hold N rows of it, and every write-back come back as an update.
INTERFACE_COLUMNS = ["name", "type", "options", "ofport", "cfm_fault"]
TUNNEL_TYPES = frozenset(kind.value for kind in TunnelType)
OPEN_VSWITCH_COLUMNS = ["other_config"]
# Which bridge holds each Interface, and that bridge's datapath: a tunnel on the userspace datapath
# is beyond kernel IPsec (model.USERSPACE_DATAPATH).
BRIDGE_COLUMNS = ["ports", "datapath_type"]
PORT_COLUMNS = ["interfaces"]
SCHEMA_FILES = ("/usr/share/openvswitch/vswitch.ovsschema", "/usr/local/share/openvswitch/vswitch.ovsschema")


def fetch_schema(remote: str, timeout: float = 5.0) -> dict:
    """Ask the server for the Open_vSwitch schema, so we never depend on a file matching it.

    Only unix: and tcp: remotes are queried directly; for others the packaged schema is used.
    """
    kind, _, rest = remote.partition(":")
    try:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = rest
        elif kind == "tcp":
            host, _, port = rest.rpartition(":")
            sock = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
            address = (host.strip("[]"), int(port))
        else:
            return _schema_from_file(remote)
        with sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(json.dumps({"method": "get_schema", "params": ["Open_vSwitch"], "id": 0}).encode())
            return _read_json_reply(sock)["result"]
    except (OSError, ValueError, KeyError) as exc:
        raise OvsIpsecError(f"cannot read the Open_vSwitch schema from {remote}: {exc}") from exc


def _read_json_reply(sock: socket.socket) -> dict:
    decoder = json.JSONDecoder()
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed before a complete reply")
        buffer += chunk
        try:
            reply, _ = decoder.raw_decode(buffer.decode())
            return reply
        except ValueError:
            continue  # incomplete JSON: read more


def _schema_from_file(remote: str) -> dict:
    for path in SCHEMA_FILES:
        try:
            with open(path) as handle:
                return json.load(handle)
        except OSError:
            continue
    raise OvsIpsecError(f"remote {remote} is not unix: or tcp:, and no vswitch.ovsschema was found")


class _TrackingIdl(ovs.db.idl.Idl):
    """An IDL that remembers which Interface rows changed since the last snapshot."""

    def __init__(self, remote: str, schema_helper: ovs.db.idl.SchemaHelper) -> None:
        super().__init__(remote, schema_helper)
        self.changed_interfaces: set = set()
        # Every Interface row touched in any way (deletions too), for the status writer, which
        # then looks at those rows only.
        self.touched_interfaces: set = set()
        self.topology_changed = True  # a Bridge or Port changed: which datapath holds which Interface
        self.shared_types: dict = {}  # Interface type -> the one Datum every row of that type holds
        # What an Interface row holds for a transaction of this IDL: none, ever (the status writer
        # has its own session). python-ovs gives each row three empty dicts for that, 1 MB at
        # 5000 rows; they share one that cannot be written, so a transaction would fail loudly.
        self.no_transaction: types.MappingProxyType = types.MappingProxyType({})

    def notify(self, event, row, updates=None):  # noqa: D401 - python-ovs hook
        if row._table.name in ("Bridge", "Port"):
            self.topology_changed = True
        elif row._table.name == "Interface":
            self.touched_interfaces.add(row.uuid)
            if event == ovs.db.idl.ROW_CREATE:
                for slot in ("_changes", "_mutations", "_prereqs"):
                    row.__dict__[slot] = self.no_transaction
            if event != ovs.db.idl.ROW_DELETE:
                _share_repeated_strings(row)
                _share_type(row, self.shared_types)
            self.changed_interfaces.add(row.uuid)


def _share_repeated_strings(row) -> None:
    """Make the strings every tunnel row repeats (its type, the option names) one object each.
    The JSON parser makes a new str for every occurrence: at 5000 tunnels those copies were 3 MB
    of the replica. Values that differ per row (names, addresses, secrets) are left alone;
    interning changes neither a string's value nor its hash, only its identity."""
    for column in ("type", "options"):
        datum = row._data.get(column)
        if datum is None:
            continue
        for key in datum.values:
            key.value = sys.intern(key.value)


def _share_type(row, shared: dict) -> None:
    """Make every row of one type hold the same `type` Datum: a Datum, its dict and its Atom are
    about 300 bytes, 1.5 MB of the replica at 5000 tunnels, all equal. Safe because `type` is a
    scalar that is never empty: python-ovs changes such a Datum by replacing it (Datum.diff
    returns the new one), never in place as it does sets, maps and empty optionals. Tunnel types
    only: any other string a writer puts there would stay in `shared` for ever."""
    datum = row._data.get("type")
    if datum is None or datum.type.n_min != 1 or datum.type.n_max != 1 or len(datum.values) != 1:
        return
    (atom,) = datum.values
    if atom.value in TUNNEL_TYPES:
        row._data["type"] = shared.setdefault(atom.value, datum)


class OvsdbReader:
    """Owns the IDL connection; `run()` then `snapshot()` when `changed`."""

    def __init__(self, remote: str) -> None:
        helper = ovs.db.idl.SchemaHelper(schema_json=fetch_schema(remote))
        helper.register_columns("Interface", INTERFACE_COLUMNS)
        helper.register_columns("Open_vSwitch", OPEN_VSWITCH_COLUMNS)
        helper.register_columns("Bridge", BRIDGE_COLUMNS)
        helper.register_columns("Port", PORT_COLUMNS)
        self.remote = remote
        self._idl = _TrackingIdl(remote, helper)
        # Only netdev bridges and their ports are replicated (monitor_cond): on a kernel-datapath
        # host the Bridge and Port rows of N tunnels would cost a quarter of the monitor's memory.
        self._idl.cond_change("Bridge", [["datapath_type", "==", USERSPACE_DATAPATH]])
        self._idl.cond_change("Port", [])  # no netdev bridge seen yet: no port
        self._rows: dict = {}  # Interface uuid -> InterfaceRow, as last handed out
        self._changes = ChangeLog.start()
        self._datapaths: dict = {}  # Interface UUID -> its bridge's datapath_type, netdev bridges only
        self._seen_seqno = -1

    def run(self) -> bool:
        """Process what the server sent; true when a new snapshot is available.

        Not while the server has yet to send the ports of a netdev bridge just seen: a snapshot
        taken then would show that bridge's tunnels on the kernel datapath, and load them."""
        self._idl.run()
        if self._idl.topology_changed:
            self._idl.cond_change("Port", [["_uuid", "==", ["uuid", str(uuid)]]
                                           for uuid in sorted(self._netdev_ports())])
        ports = self._idl.tables["Port"].condition_state
        if ports.new is not None or ports.requested is not None:
            return False
        return self._idl.has_ever_connected() and self._idl.change_seqno != self._seen_seqno

    def _netdev_ports(self) -> set:
        """The UUIDs of the netdev bridges' ports, from the references themselves: the rows they
        point to are replicated only once asked for (python-ovs drops unknown references from
        `bridge.ports`, hence the raw datum)."""
        return {uuid for bridge in self._idl.tables["Bridge"].rows.values()
                if bridge.datapath_type == USERSPACE_DATAPATH
                for uuid in bridge._data["ports"].as_list()}

    @property
    def idl(self) -> ovs.db.idl.Idl:
        """The live IDL, for the status writer in this same (main) thread."""
        return self._idl

    def wait(self, poller: ovs.poller.Poller) -> None:
        self._idl.wait(poller)

    def close(self) -> None:
        self._idl.close()

    def snapshot(self) -> DesiredState:
        """The rows as of now: the previous snapshot's rows with those the IDL reported changed
        converted again, and which keys changed (the snapshot's ChangeLog)."""
        self._seen_seqno = self._idl.change_seqno
        changed, self._idl.changed_interfaces = self._idl.changed_interfaces, set()
        if self._idl.topology_changed:
            self._idl.topology_changed = False
            # Only the userspace datapath changes what a tunnel is (model.USERSPACE_DATAPATH), and
            # every one-tunnel add or delete changes a Bridge and a Port: walking the ports of every
            # bridge would make each such change cost O(N). Only netdev bridges are walked.
            netdev = [bridge for bridge in self._idl.tables["Bridge"].rows.values()
                      if bridge.datapath_type == USERSPACE_DATAPATH]
            datapaths = datapath_of_interfaces(netdev)
            changed |= {uuid for uuid in datapaths.keys() | self._datapaths.keys()
                        if datapaths.get(uuid) != self._datapaths.get(uuid)}
            self._datapaths = datapaths
        current = self._idl.tables["Interface"].rows
        rows = dict(self._rows)  # never modify a dict already handed out: snapshots cross threads
        keys = set()
        for uuid in changed:
            row = current.get(uuid)
            new = interface_from_row(row, self._datapaths.get(uuid)) if row is not None else None
            if new != rows.get(uuid):
                keys.add(uuid)
                if new is None:
                    del rows[uuid]
                else:
                    rows[uuid] = new
        if len(rows) != len(current):
            # The IDL reconnected and cleared its tables, which it does without a notification
            # per row: rows deleted meanwhile are still here (every live row was notified again).
            keys.update(uuid for uuid in rows if uuid not in current)
            rows = {uuid: row for uuid, row in rows.items() if uuid in current}
        self._rows = rows
        self._changes = self._changes.advance(keys)
        return DesiredState(global_config=self._global_config(), interfaces=rows, changes=self._changes)

    def _global_config(self) -> GlobalConfig:
        other_config: dict = {}
        for row in self._idl.tables["Open_vSwitch"].rows.values():
            other_config = dict(row.other_config)  # one row in practice; upstream: last one wins
        return global_config_from(other_config)


def datapath_of_interfaces(bridges) -> dict:
    """Interface UUID -> datapath_type of the bridge whose port holds it ("" is the default, the
    kernel's datapath). Walks every port: done only when a Bridge or Port row changed."""
    return {interface.uuid: bridge.datapath_type
            for bridge in bridges for port in bridge.ports for interface in port.interfaces}


def interface_from_row(row, datapath_type: str | None = None) -> InterfaceRow:
    ofport = row.ofport[0] if row.ofport else None
    cfm_fault = row.cfm_fault[0] if row.cfm_fault else None
    return InterfaceRow(
        name=row.name,
        type=row.type,
        options=tuple(sorted(row.options.items())),
        ofport=ofport if ofport is not None and ofport >= 0 else None,
        cfm_fault=cfm_fault,
        datapath_type=datapath_type,
    )


def global_config_from(other_config: dict[str, str]) -> GlobalConfig:
    # `default_ipsec_skb_mark` is the name some older deployments used; the documented key wins.
    skb_mark = other_config.get("ipsec_skb_mark", other_config.get("default_ipsec_skb_mark"))
    return GlobalConfig(
        certificate=other_config.get("certificate") or None,
        private_key=other_config.get("private_key") or None,
        ca_cert=other_config.get("ca_cert") or None,
        skb_mark=skb_mark or None,
    )
