"""Builders for unit tests: OVSDB rows the way ovs-vsctl would store them."""

from __future__ import annotations

from ovs_ipsec.model import DesiredState, GlobalConfig, InterfaceRow


def row(name: str, type: str = "geneve", **options: str) -> InterfaceRow:
    return InterfaceRow(name=name, type=type, options=tuple(sorted(options.items())))


def desired(*rows: InterfaceRow, **global_config: str) -> DesiredState:
    """Rows keyed by name, as OVSDB keys them by UUID (a repeated name gets a key of its own)."""
    keys = [row.name for row in rows]
    return DesiredState(GlobalConfig(**global_config),
                        {(key if keys.count(key) == 1 else f"{key}#{index}"): row for index, (key, row) in
                         enumerate(zip(keys, rows, strict=True))})
