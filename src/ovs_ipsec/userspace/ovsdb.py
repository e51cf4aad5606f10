"""The userspace ESP process's own read-only OVSDB view: Interfaces with the Bridge they are on.

Separate from the monitor's reader (ovsdb/reader.py, whose schema fetch it reuses): this
process needs Bridge.datapath_type and the Port that joins a bridge to an interface, the monitor
does not. Rows leave as frozen TunnelRow values; nothing is validated here (sa.validate does).
"""

from __future__ import annotations

import ovs.db.idl
import ovs.poller

from ..ovsdb.reader import fetch_schema
from .sa import TunnelRow

INTERFACE_COLUMNS = ["name", "type", "options"]
PORT_COLUMNS = ["name", "interfaces"]
BRIDGE_COLUMNS = ["name", "ports", "datapath_type"]


class EspOvsdbReader:
    def __init__(self, remote: str) -> None:
        helper = ovs.db.idl.SchemaHelper(schema_json=fetch_schema(remote))
        helper.register_columns("Interface", INTERFACE_COLUMNS)
        helper.register_columns("Port", PORT_COLUMNS)
        helper.register_columns("Bridge", BRIDGE_COLUMNS)
        self._idl = ovs.db.idl.Idl(remote, helper)
        self._seen_seqno = -1

    def run(self) -> bool:
        """Process what the server sent; true when the rows changed since the last `rows()`."""
        self._idl.run()
        return self._idl.has_ever_connected() and self._idl.change_seqno != self._seen_seqno

    def wait(self, poller: ovs.poller.Poller) -> None:
        self._idl.wait(poller)

    def close(self) -> None:
        self._idl.close()

    def rows(self) -> tuple[TunnelRow, ...]:
        self._seen_seqno = self._idl.change_seqno
        where: dict = {}  # Interface UUID -> (bridge name, datapath_type)
        for bridge in self._idl.tables["Bridge"].rows.values():
            for port in bridge.ports:
                for interface in port.interfaces:
                    where[interface.uuid] = (bridge.name, bridge.datapath_type)
        rows = []
        for uuid, row in self._idl.tables["Interface"].rows.items():
            bridge, datapath_type = where.get(uuid, (None, None))
            rows.append(TunnelRow(uuid=str(uuid), name=row.name, type=row.type,
                                  options=tuple(sorted(row.options.items())), bridge=bridge,
                                  datapath_type=datapath_type))
        return tuple(sorted(rows, key=lambda r: (r.name, r.uuid)))
