"""Indexes from a key to its few members, kept as tuples.

The incremental parts of the monitor keep several such indexes with one entry per tunnel (a
tunnel name to its rows, an endpoint pair to its tunnels, ...), and nearly every entry holds one
member. A one-element set costs 216 bytes, a one-element tuple 48: at 10,000 tunnels that is
about 1.7 MB per index. Adding or removing a member copies the tuple, which for a handful of
members costs less than hashing into a set.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)
Member = TypeVar("Member")


def add_member(index: dict[Key, tuple[Member, ...]], key: Key, member: Member) -> None:
    members = index.get(key, ())
    if member not in members:
        index[key] = (*members, member)


def discard_member(index: dict[Key, tuple[Member, ...]], key: Key, member: Member) -> None:
    members = tuple(other for other in index.get(key, ()) if other != member)
    if members:
        index[key] = members
    else:
        index.pop(key, None)
