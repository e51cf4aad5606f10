"""Builders for unit tests: OVSDB rows the way ovs-vsctl would store them."""

from __future__ import annotations

from ovs_ipsec.model import DesiredState, GlobalConfig, InterfaceRow


def row(name: str, type: str = "geneve", **options: str) -> InterfaceRow:
    return InterfaceRow(name=name, type=type, options=tuple(sorted(options.items())))


def desired(*rows: InterfaceRow, **global_config: str) -> DesiredState:
    return DesiredState(GlobalConfig(**global_config), tuple(rows))
