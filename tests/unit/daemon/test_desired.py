"""The incremental desired side against the whole-state rules it stands for, on random edit sequences.

DesiredPeerings validates only the rows that changed and settles only their endpoint pairs; after
every edit its outcome must be exactly what validating every row, keeping last good
configurations and grouping every tunnel gives (the reference below, which is how the monitor
worked before it became incremental).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from testsupport.fakes import FakeBackend
from ovs_ipsec.daemon.desired import DesiredPeerings
from ovs_ipsec.inforce import keep_last_good
from ovs_ipsec.model import ChangeLog, DesiredState, GlobalConfig, InterfaceRow, ValidatedState
from ovs_ipsec.pki.inspect import CertificateInspector
from ovs_ipsec.planner import group_peerings
from ovs_ipsec.validate import CertificateFacts, validate

NAMING = FakeBackend.naming


def reference(desired: DesiredState, before: ValidatedState, now: float):
    validated = validate(desired, CertificateFacts(), now)
    validated = keep_last_good(validated, {t.name: t for t in before.tunnels}, before.kept, now)
    peerings, conflicts = group_peerings(validated.tunnels, NAMING)
    clashing = {c.name for c in conflicts}
    return ValidatedState(tuple(t for t in validated.tunnels if t.name not in clashing),
                          validated.invalid + conflicts, validated.global_problem, validated.guard,
                          {n: s for n, s in validated.kept.items() if n not in clashing}), peerings


# A small world, so that edits collide: few names, two endpoint pairs, two PSKs, one port that
# two tunnel types share, rows that are invalid or not IPsec at all, rows on the userspace datapath.
ROWS = st.builds(
    lambda kind, local, remote, auth, port, datapath: (kind, tuple(sorted(
        {**({"local_ip": local} if local else {}), "remote_ip": remote, **auth, **port}.items())), datapath),
    kind=st.sampled_from(["geneve", "vxlan", "gre"]),
    local=st.sampled_from(["10.0.0.1", None]),
    remote=st.sampled_from(["10.0.0.2", "10.0.0.3", "not-an-address"]),
    auth=st.sampled_from([{"psk": "x"}, {"psk": "y"}, {"psk": ""}, {}, {"remote_name": "peer"}]),
    port=st.sampled_from([{}, {"dst_port": "4789"}, {"dst_port": "6081"}]),
    datapath=st.sampled_from([None, "", "system", "netdev"]),  # netdev: unprotected, not guarded
)
# (name, new row or None to delete it, whether the row is replaced by a new one, as ovn-controller
# does, rather than updated in place)
EDITS = st.lists(st.tuples(st.sampled_from("abcde"), st.one_of(st.none(), ROWS), st.booleans()),
                 min_size=1, max_size=25)


def _key(validated: ValidatedState):
    return (sorted(map(repr, validated.tunnels)), sorted(map(repr, validated.invalid)), dict(validated.kept),
            validated.global_problem, validated.guard)


@settings(max_examples=300, deadline=None)
@given(edits=EDITS, journal=st.booleans())
def test_incremental_outcome_is_the_whole_state_outcome(edits, journal):
    incremental = DesiredPeerings(NAMING, CertificateInspector())
    rows: dict = {}
    key_of: dict[str, int] = {}
    changes = ChangeLog.start()
    before, peerings_before = ValidatedState((), ()), {}
    for now, (name, content, replaced) in enumerate(edits, start=1000):
        rows, changed_keys = dict(rows), set()
        if name in key_of and (content is None or replaced):
            changed_keys.add(key_of[name])
            del rows[key_of.pop(name)]
        if content is not None:
            key_of.setdefault(name, now)
            kind, options, datapath = content
            rows[key_of[name]] = InterfaceRow(name, kind, options, datapath_type=datapath)
            changed_keys.add(key_of[name])
        changes = changes.advance(changed_keys)
        desired = DesiredState(GlobalConfig(), rows, changes if journal else ChangeLog())
        changed = incremental.update(desired, float(now))
        expected, peerings = reference(desired, before, float(now))
        assert _key(incremental.validated) == _key(expected)
        assert incremental.peerings == peerings
        assert changed == {c for c in peerings.keys() | peerings_before.keys()
                           if peerings.get(c) != peerings_before.get(c)}
        assert incremental.secret_ids.keys() == {p.secret_id for p in peerings.values() if p.secret_id}
        assert incremental.peering_of == {t.name: p for p in peerings.values() for t in p.tunnels}
        before, peerings_before = expected, peerings


def test_a_one_row_change_settles_one_endpoint_pair():
    incremental = DesiredPeerings(NAMING, CertificateInspector())
    rows = {i: InterfaceRow(f"gnv{i}", "geneve", (("local_ip", "10.0.0.1"), ("psk", "x"),
                                                   ("remote_ip", f"10.1.{i // 250}.{i % 250 + 1}")))
            for i in range(1000)}
    changes = ChangeLog.start()
    incremental.update(DesiredState(GlobalConfig(), rows, changes), 1000.0)
    rows = dict(rows)
    rows[1000] = InterfaceRow("new", "gre", (("psk", "x"), ("remote_ip", "10.9.9.9")))
    del rows[3]
    changes = changes.advance({1000, 3})
    changed = incremental.update(DesiredState(GlobalConfig(), rows, changes), 1001.0)
    assert incremental.touched_names == {"new", "gnv3"}
    assert len(changed) == 2 and len(incremental.peerings) == 1000
    # and with nothing changed, nothing is looked at again
    assert incremental.update(DesiredState(GlobalConfig(), rows, changes), 1002.0) == set()
    assert incremental.touched_names == frozenset()


def test_a_kept_tunnel_that_loses_its_peering_is_not_kept_again():
    """b's last good configuration is kept, then a valid tunnel with another PSK takes its peer:
    the kept one gives way, and from the next update on nothing of b is in force any more."""
    incremental = DesiredPeerings(NAMING, CertificateInspector())
    peer = (("local_ip", "10.0.0.1"), ("remote_ip", "10.0.0.2"))
    steps = [{"b": ("gre", peer + (("psk", "x"),))},
             {"b": ("gre", peer + (("psk", ""),))},  # invalid: the psk=x form is kept
             {"a": ("geneve", peer + (("psk", "y"),))},  # a is first by name: b's kept form clashes
             {"c": ("gre", (("psk", "x"), ("remote_ip", "10.0.0.9")))}]  # unrelated
    rows, changes = {}, ChangeLog.start()
    before = ValidatedState((), ())
    for now, step in enumerate(steps, start=1000):
        rows = {**rows, **{name: InterfaceRow(name, *content) for name, content in step.items()}}
        changes = changes.advance(step.keys())
        desired = DesiredState(GlobalConfig(), rows, changes)
        incremental.update(desired, float(now))
        expected, _ = reference(desired, before, float(now))
        assert _key(incremental.validated) == _key(expected)
        before = expected
    assert [i.name for i in incremental.validated.invalid] == ["b"] and not incremental.validated.kept
