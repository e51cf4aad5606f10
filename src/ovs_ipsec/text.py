"""Untrusted text made safe to show to a person: escaped, never interpreted.

Anyone who can write OVSDB chooses interface names, option values and paths. Shown raw, a
newline forges a log line, an escape sequence drives the operator's terminal, U+2028 or a
bidirectional override reorders what is read. Every human-facing line (logs, `tunnels/show`,
`ovs-ipsec status`, events) passes through `printable`; every message that quotes a value from
OVSDB quotes it with `shown`.
"""

from __future__ import annotations

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
SHOWN_LIMIT = 80


def printable(text: str) -> str:
    """`text` with every character that is not printable (Unicode's own rule, space allowed)
    written as an escape. Idempotent: text already escaped passes unchanged, so a message that
    quotes a value with `shown` can go through `printable` again on its way out."""
    if text.isprintable():
        return text  # the common case costs one scan
    return "".join(_escape(char) for char in text)


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """A value from OVSDB as a message quotes it: in single quotes, escaped, cut at `limit`."""
    text = str(value)
    cut = len(text) > limit
    return f"'{printable(text[:limit])}{'...' if cut else ''}'"


def _escape(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
