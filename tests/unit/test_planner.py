"""Planner: peerings share one IKE connection; removals of our stale objects; initiation by the rule."""

from __future__ import annotations

from dataclasses import replace

from testsupport.builders import desired, row
from ovs_ipsec.backends.strongswan.backend import StrongSwanBackend
from ovs_ipsec.model import ObservedSA, ObservedState
from ovs_ipsec.planner import (
    Initiate, LoadConn, LoadSecret, Memory, TerminateChild, UnloadConn, UnloadSecret, group_peerings, is_initiator,
    plan, secret_digest, with_children_of,
)
from ovs_ipsec.validate import CertificateFacts, validate

NAMING = StrongSwanBackend.naming
NO_MEMORY = Memory({}, {})
A = row("a", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish")
A2 = row("a2", "gre", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish")
B = row("b", "gre", local_ip="10.0.0.9", remote_ip="10.0.0.3", psk="other")


def peerings(*rows):
    result, conflicts = group_peerings(validate(desired(*rows), CertificateFacts(), 0).tunnels, NAMING)
    return result, conflicts


def only(*rows):
    (peering,) = peerings(*rows)[0].values()
    return peering


def observed(conns=None, secrets=(), sas=None):
    return ObservedState(conns or {}, frozenset(secrets), sas or {})


def converged(peering, installed=None):
    children = frozenset(child for child, _ in peering.children)
    up = ObservedSA(peering.conn_name, "1", "ESTABLISHED", 5, tuple(sorted(installed if installed is not None
                                                                             else children)))
    return (observed({peering.conn_name: children}, [peering.secret_id], {peering.conn_name: (up,)}),
            Memory({peering.secret_id: secret_digest(peering.psk)}, {}))


def test_fresh_peering_gets_secret_then_conn_then_one_initiation():
    p = only(A)
    assert plan({p.conn_name: p}, observed(), NO_MEMORY, 0) == (
        LoadSecret(p), LoadConn(p), Initiate(p.conn_name, p.children[0][0]))


def test_tunnels_between_the_same_hosts_share_one_connection():
    p = only(A, A2)
    assert [t.name for t in p.tunnels] == ["a", "a2"]
    assert [owner for _, owner in p.children] == ["a", "a", "a2"]


def test_tunnels_to_the_same_peer_must_agree_on_psk_and_ike_options():
    _, conflicts = peerings(A, row("a2", "gre", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="different"))
    assert "its 'psk' differs from tunnel 'a'" in conflicts[0].reason
    _, conflicts = peerings(A, row("a2", "gre", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish",
                                   ipsec_ike="aes128-sha256-modp2048"))
    assert "IKE options differ from tunnel 'a'" in conflicts[0].reason


def test_responder_side_never_initiates():
    p = only(B)  # 10.0.0.9 > 10.0.0.3
    assert not any(isinstance(a, Initiate) for a in plan({p.conn_name: p}, observed(), NO_MEMORY, 0))


def test_converged_peering_needs_nothing():
    p = only(A)
    state, memory = converged(p)
    assert plan({p.conn_name: p}, state, memory, 0) == ()


def test_adding_a_tunnel_to_an_established_peering_updates_the_connection_in_place():
    before = only(A)
    after = only(A, A2)
    assert before.conn_name == after.conn_name
    state, memory = converged(before)
    (gre_child,) = after.children_of("a2")
    assert plan({after.conn_name: after}, state, memory, 0) == (LoadConn(after), Initiate(after.conn_name, gre_child))


def test_removing_a_tunnel_from_a_peering_ends_only_its_child_sas():
    before = only(A, A2)
    after = only(A)
    state, memory = converged(before)
    (gre_child,) = before.children_of("a2")
    assert plan({after.conn_name: after}, state, memory, 0) == (LoadConn(after),
                                                                 TerminateChild(after.conn_name, gre_child))


def test_missing_children_are_initiated_over_the_established_ike_sa():
    p = only(A)
    first, second = p.children_of("a")
    state, memory = converged(p, installed=[first])
    assert plan({p.conn_name: p}, state, memory, 0) == (Initiate(p.conn_name, second),)


def test_connecting_sa_is_left_alone_and_backoff_is_respected():
    p = only(A)
    state, memory = converged(p)
    connecting = observed(state.conns, state.shared_secrets,
                          {p.conn_name: (ObservedSA(p.conn_name, "1", "CONNECTING", None, ()),)})
    assert plan({p.conn_name: p}, connecting, memory, 0) == ()
    assert plan({p.conn_name: p}, observed(), Memory({}, {p.conn_name: 10.0}), now=5.0) == ()


def test_changed_psk_is_reloaded():
    p = only(A)
    state, _ = converged(p)
    assert plan({p.conn_name: p}, state, Memory({p.secret_id: "old"}, {}), 0) == (LoadSecret(p),)


def test_stale_objects_of_ours_are_removed_the_secret_first():
    # Whoever sees the connection gone sees its secret gone (tests/functional/test_backend_contract.py).
    stale = observed({"ovsipsec-10.0.0.7-0123456789": frozenset()}, ["ovsipsec-10.0.0.7-0123456789"])
    assert plan({}, stale, NO_MEMORY, 0) == (UnloadSecret("ovsipsec-10.0.0.7-0123456789"),
                                             UnloadConn("ovsipsec-10.0.0.7-0123456789"))


def test_a_replaced_connection_goes_after_its_replacement_is_in_and_initiated_when_the_daemon_allows_it():
    old = only(A)
    new = only(row("a", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish",
                   ipsec_ike="aes128gcm16-sha256-curve25519"))
    assert new.conn_name != old.conn_name
    state, memory = converged(old)
    replacement = [LoadSecret(new), LoadConn(new)]
    removal = [UnloadSecret(old.secret_id), UnloadConn(old.conn_name)]
    initiation = [Initiate(new.conn_name, new.children[0][0])]
    assert plan({new.conn_name: new}, state, memory, 0) == tuple(removal + replacement + initiation)
    assert plan({new.conn_name: new}, state, memory, 0, make_before_break=True) == tuple(
        replacement + initiation + removal)


def test_new_children_of_a_loaded_connection_go_in_beside_the_old_ones_before_those_go():
    old = only(A)
    new = only(row("a", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish",
                   ipsec_esp="aes128gcm16-curve25519"))
    assert new.conn_name == old.conn_name and set(new.children).isdisjoint(old.children)
    state, memory = converged(old, installed=())
    desired_now = {new.conn_name: new}

    def loads(memory, make_before_break=True, state=state):
        return [a for a in plan(desired_now, state, memory, 0, make_before_break=make_before_break)
                if isinstance(a, LoadConn)]

    assert loads(memory) == [LoadConn(new)]  # not known as what we loaded: no guess
    known = replace(memory, loaded={old.conn_name: old})
    both, alone = loads(known)
    assert both == LoadConn(with_children_of(new, old)) and alone == LoadConn(new)
    assert {child for child, _ in both.peering.children} == {child for child, _ in old.children + new.children}
    assert loads(known, make_before_break=False) == [LoadConn(new)]
    # what charon holds is not what we last loaded (a load failed meanwhile): no guess either
    other = observed({old.conn_name: frozenset({"a-out-000000"})}, [old.secret_id])
    assert loads(known, state=other) == [LoadConn(new)]


def test_scope_limits_work_to_the_named_connections():
    both, _ = peerings(A, B)
    b_conn = only(B).conn_name
    actions = plan(both, observed(), NO_MEMORY, 0, scope={b_conn})
    assert {getattr(a, "peering", None) and a.peering.conn_name for a in actions} == {b_conn}


def test_initiator_rule_is_symmetric():
    mine = validate(desired(A), CertificateFacts(), 0).tunnels[0]
    theirs = validate(desired(row("a", "geneve", local_ip="10.0.0.2", remote_ip="10.0.0.1", psk="x")),
                      CertificateFacts(), 0).tunnels[0]
    assert is_initiator(mine) != is_initiator(theirs)


def test_responder_waits_for_its_peer_unless_told_to_take_over():
    p = only(row("a", "geneve", local_ip="10.0.0.2", remote_ip="10.0.0.1", psk="swordfish"))
    assert not p.initiator
    loaded = observed({p.conn_name: frozenset(child for child, _ in p.children)}, [p.secret_id])
    memory = Memory({p.secret_id: secret_digest(p.psk)}, {})
    assert plan({p.conn_name: p}, loaded, memory, 0) == ()
    # Our IKE daemon restarted: the peer's SA is a ghost it has not noticed; we initiate.
    takeover = Memory(memory.secret_digests, {}, frozenset({p.conn_name}))
    assert plan({p.conn_name: p}, loaded, takeover, 0) == (Initiate(p.conn_name, p.children[0][0]),)


def test_initiations_come_after_every_load_of_the_batch():
    both, _ = peerings(A, row("c", "gre", local_ip="10.0.0.1", remote_ip="10.0.0.5", psk="swordfish"))
    kinds = [type(action).__name__ for action in plan(both, observed(), NO_MEMORY, 0)]
    assert kinds == ["LoadSecret", "LoadConn", "LoadSecret", "LoadConn", "Initiate", "Initiate"]
