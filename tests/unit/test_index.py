"""Indexes from a key to its few members, as tuples."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ovs_ipsec.index import add_member, discard_member


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 3))))
def test_an_index_holds_what_a_dict_of_sets_would(operations):
    index: dict[int, tuple[int, ...]] = {}
    reference: dict[int, set[int]] = {}
    for add, key, member in operations:
        if add:
            add_member(index, key, member)
            reference.setdefault(key, set()).add(member)
        else:
            discard_member(index, key, member)
            reference.get(key, set()).discard(member)
            if not reference.get(key, True):
                del reference[key]
        assert {key: set(members) for key, members in index.items()} == reference
        assert all(len(set(members)) == len(members) for members in index.values())
