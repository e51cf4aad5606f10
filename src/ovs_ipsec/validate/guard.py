"""other_config:ipsec_skb_mark and the rows' tunnel traffic -> the guard's typed configuration."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..model import DEFAULT_PORTS, GlobalConfig, GuardConfig, InterfaceRow, SkbMark, TunnelType, wire_traffic
from ..text import shown
from . import fields
from .certificates import is_ipsec_interface
from .fields import Reject

_MARK_NUMBER = re.compile(r"0[xX][0-9a-fA-F]{1,8}|[0-9]{1,10}")
_USAGE = "expected value/mask such as 0/1 or 1/1, each a 32-bit number in decimal or 0x hex"


def guard_config(config: GlobalConfig, rows: Iterable[InterfaceRow]) -> GuardConfig:
    rows = tuple(rows)
    traffic = frozenset(t for t in map(traffic_of_row, rows) if t is not None)
    # Names as the operator wrote them; the status output escapes them (text.printable).
    uncovered = tuple(sorted(r.name for r in rows if r.userspace_datapath and is_ipsec_interface(dict(r.options))))
    if config.skb_mark is None:
        return GuardConfig(traffic=traffic, uncovered=uncovered)
    try:
        return GuardConfig(config.skb_mark, parse_skb_mark(config.skb_mark), traffic=traffic, uncovered=uncovered)
    except ValueError as exc:
        return GuardConfig(config.skb_mark, None, str(exc), traffic, uncovered)


def parse_skb_mark(text: str) -> SkbMark:
    """other_config:ipsec_skb_mark `value/mask` (or `value`, mask 0xffffffff), decimal or 0x hex.

    Raises ValueError with the message an operator needs. The value must fit in the mask: a bit
    of the value outside the mask could never match, and the guard would silently block nothing.
    """
    value_text, slash, mask_text = text.strip(" ").partition("/")
    if not slash:
        mask_text = "0xffffffff"
    numbers = []
    for part, what in ((value_text, "value"), (mask_text, "mask")):
        part = part.strip(" ")
        if not _MARK_NUMBER.fullmatch(part):
            raise ValueError(f"other_config:ipsec_skb_mark {shown(text)}: {what} {shown(part)} is not a number "
                             f"({_USAGE})")
        number = int(part, 16) if part[:2] in ("0x", "0X") else int(part)
        if number > 0xFFFFFFFF:
            raise ValueError(f"other_config:ipsec_skb_mark {shown(text)}: {what} {shown(part)} does not fit in "
                             f"32 bits ({_USAGE})")
        numbers.append(number)
    value, mask = numbers
    if value & ~mask:
        raise ValueError(f"other_config:ipsec_skb_mark {shown(text)}: value {value:#x} has bits outside mask "
                         f"{mask:#x}, so no packet could ever match it")
    return SkbMark(value, mask)


def traffic_of_row(row: InterfaceRow) -> tuple[str, int | None] | None:
    """A tunnel Interface row's protocol and port, IPsec or not; None for anything else."""
    try:
        tunnel_type = TunnelType(row.type)
    except ValueError:
        return None
    if tunnel_type in (TunnelType.GRE, TunnelType.IP6GRE):
        return ("gre", None)
    value = row.option("dst_port")
    if value is None:
        return wire_traffic(tunnel_type, DEFAULT_PORTS[tunnel_type])
    try:
        return wire_traffic(tunnel_type, fields.port(value, "dst_port"))
    except Reject:
        return None  # vswitchd rejects it too: no traffic
