"""The strongSwan adapter against a VICI server that answers like charon (testsupport.fakecharon)."""

from __future__ import annotations

import pytest

from ovs_ipsec.backends.strongswan.backend import StrongSwanBackend
from ovs_ipsec.errors import BackendError
from ovs_ipsec.planner import Initiate, LoadConn, LoadSecret, TerminateChild, UnloadConn, UnloadSecret, group_peerings
from ovs_ipsec.validate import CertificateFacts, validate
from testsupport.builders import desired, row
from testsupport.fakecharon import FakeCharon

PSK = dict(local_ip="10.0.0.1", remote_ip="10.0.0.2", psk='sw"ord # fish\n')


@pytest.fixture
def charon(tmp_path):
    server = FakeCharon(tmp_path / "charon.vici")
    yield server
    server.close()


@pytest.fixture
def backend(charon):
    adapter = StrongSwanBackend(f"unix://{charon.path}", timeout=2)
    yield adapter
    adapter.close()


def peering_of(*rows):
    (peering,) = group_peerings(validate(desired(*rows), CertificateFacts(), 0).tunnels,
                                StrongSwanBackend.naming)[0].values()
    return peering


def test_loading_a_peering_then_observing_it(charon, backend):
    peering = peering_of(row("gnv", "geneve", **PSK))
    backend.apply(LoadSecret(peering))
    backend.apply(LoadConn(peering))
    assert charon.shared[peering.secret_id]["data"] == PSK["psk"].encode()  # bytes as they are: VICI is binary-safe
    assert set(charon.conns) == {peering.conn_name}
    children = [child for child, _ in peering.children]
    charon.establish(peering.conn_name, "7", {children[0]: "INSTALLED", children[1]: "REKEYING"})
    charon.conns["operator-vpn"] = {"children": {}}  # not ours: never observed
    observed = backend.observe(None)
    assert set(observed.conns) == {peering.conn_name} and observed.shared_secrets == {peering.secret_id}
    (sa,) = observed.sas_of(peering.conn_name)
    assert sa.established and sa.unique_id == "7" and sa.installed_children == (children[0],)
    assert observed.daemon_id  # which charon process answers
    scoped = backend.observe([peering.conn_name])
    assert set(scoped.conns) == {peering.conn_name} and scoped.shared_secrets == frozenset()


def test_unloading_ends_the_sas_and_a_missing_one_is_not_an_error(charon, backend):
    peering = peering_of(row("gnv", "geneve", **PSK))
    backend.apply(LoadConn(peering))
    charon.establish(peering.conn_name, "7", {})
    backend.apply(TerminateChild(peering.conn_name, "nothing-up"))  # "no matching SAs": fine
    backend.apply(UnloadConn(peering.conn_name))
    backend.apply(UnloadSecret(peering.conn_name))
    assert charon.conns == {} and charon.sas == {}
    assert charon.requests[-3:] == ["unload-conn", "terminate", "unload-shared"]


def test_a_refusal_fails_one_action_and_a_silent_charon_is_a_transport_error(charon, backend):
    peering = peering_of(row("gnv", "geneve", **PSK))
    charon.refuse["load-conn"] = "invalid proposal"
    with pytest.raises(BackendError) as refused:
        backend.apply(LoadConn(peering))
    assert not refused.value.transport and "charon refused load-conn" in str(refused.value)
    charon.hang.add("initiate")
    with pytest.raises(BackendError) as silent:
        backend.apply(Initiate(peering.conn_name, peering.children[0][0]))
    assert silent.value.transport  # the worker then stops the batch and retries in full later
    del charon.refuse["load-conn"]
    backend.apply(LoadConn(peering))  # a new session after the broken one
    assert peering.conn_name in charon.conns


def test_private_keys_are_loaded_once_and_unloaded_when_no_peering_needs_them(charon, backend):
    import dataclasses

    peering = peering_of(row("gnv", "geneve", **PSK))
    keyed = dataclasses.replace(peering, tunnels=tuple(dataclasses.replace(t, local_key_pem=b"-----KEY-----")
                                                       for t in peering.tunnels))
    backend.apply(LoadConn(keyed))
    backend.apply(LoadConn(keyed))
    assert charon.requests.count("load-key") == 1 and len(charon.keys) == 1
    backend.cleanup_credentials([keyed])
    assert len(charon.keys) == 1
    backend.cleanup_credentials([])
    assert charon.keys == {}


def test_a_restarted_charon_answers_the_next_call_at_once(charon, backend, tmp_path):
    peering = peering_of(row("gnv", "geneve", **PSK))
    backend.apply(LoadConn(peering))  # the session is kept for the next call
    charon.crash()
    (tmp_path / "charon.vici").unlink()
    restarted = FakeCharon(tmp_path / "charon.vici")  # a new charon, on the same socket path
    try:
        assert backend.observe(None).conns == {}  # no BackendError: the dead session was replaced
        backend.apply(LoadConn(peering))
        assert set(restarted.conns) == {peering.conn_name}
    finally:
        restarted.close()


def peerings_of(count: int):
    rows = [row(f"gnv{i}", "geneve", local_ip="10.0.0.1", remote_ip=f"10.0.1.{i}", psk=f"key{i}")
            for i in range(1, count + 1)]
    peerings = group_peerings(validate(desired(*rows), CertificateFacts(), 0).tunnels, StrongSwanBackend.naming)[0]
    return sorted(peerings.values(), key=lambda p: p.conn_name)


def test_chains_are_pipelined_in_order_and_a_refusal_stops_only_its_own_chain(charon, tmp_path):
    adapter = StrongSwanBackend(f"unix://{charon.path}", timeout=2, pipeline_window=3)
    peerings = peerings_of(5)
    reported = []
    adapter.apply_chains([[LoadSecret(p), LoadConn(p)] for p in peerings],
                         lambda action, error: reported.append((action, error)))
    assert all(error is None for _, error in reported) and len(reported) == 10
    assert set(charon.conns) == set(charon.shared) == {p.conn_name for p in peerings}
    # a connection's secret goes in before it, whatever else is in flight
    for p in peerings:
        assert reported.index((LoadSecret(p), None)) < reported.index((LoadConn(p), None))

    charon.refuse["load-conn"] = "invalid proposal"
    reported.clear()
    adapter.apply_chains([[LoadConn(p), Initiate(p.conn_name, p.children[0][0])] for p in peerings[:2]]
                         + [[UnloadSecret(peerings[4].secret_id)]],
                         lambda action, error: reported.append((action, error)))
    refused = [(action, error) for action, error in reported if error is not None]
    assert [action for action, _ in refused] == [LoadConn(p) for p in peerings[:2]]
    assert all(isinstance(e, BackendError) and not e.transport and "invalid proposal" in str(e) for _, e in refused)
    assert "initiate" not in charon.requests  # the chains stopped at their refusal
    assert (UnloadSecret(peerings[4].secret_id), None) in reported and peerings[4].secret_id not in charon.shared
    adapter.close()


def test_a_connection_follows_its_secret_at_once_and_a_refused_secret_fails_only_itself(charon, backend):
    peerings = peerings_of(2)
    charon.refuse["load-shared"] = "no such key type"
    reported = []
    backend.apply_chains([[LoadSecret(p), LoadConn(p), Initiate(p.conn_name, p.children[0][0])] for p in peerings],
                         lambda action, error: reported.append((action, error)))
    # each connection went in right behind its secret, before charon answered for the secret
    assert charon.requests[:4] == ["load-shared", "load-conn", "load-shared", "load-conn"]
    assert set(charon.conns) == {p.conn_name for p in peerings} and charon.shared == {}
    refused = [action for action, error in reported if error is not None]
    assert refused == [LoadSecret(p) for p in peerings]
    assert "initiate" not in charon.requests  # nothing is initiated without its secret


@pytest.mark.parametrize("secret_request, conn_request", [("load-shared", "load-conn"),
                                                            ("unload-shared", "unload-conn")])
def test_a_connection_is_sent_before_charon_answers_for_its_secret(charon, backend, secret_request, conn_request):
    (p,) = peerings_of(1)
    backend.apply(LoadConn(p))
    loads = [LoadSecret(p), LoadConn(p)]
    removals = [UnloadSecret(p.secret_id), UnloadConn(p.conn_name)]
    charon.hang.add(secret_request)  # the secret is never answered ...
    with pytest.raises(BackendError):
        backend.apply_chains([loads if secret_request == "load-shared" else removals], lambda action, error: None)
    sent = charon.requests[charon.requests.index(secret_request):]
    assert sent[1] == conn_request  # ... and its connection went right behind it


def test_a_silent_charon_mid_pipeline_is_a_transport_error_and_the_next_batch_reconnects(charon, backend):
    peerings = peerings_of(4)
    charon.hang.add("load-conn")
    reported = []
    with pytest.raises(BackendError) as silent:
        backend.apply_chains([[LoadSecret(p), LoadConn(p)] for p in peerings],
                             lambda action, error: reported.append((action, error)))
    assert silent.value.transport
    assert all(isinstance(action, LoadSecret) and error is None for action, error in reported)
    charon.hang.clear()
    backend.apply_chains([[LoadConn(p)] for p in peerings], lambda action, error: reported.append((action, error)))
    assert set(charon.conns) == {p.conn_name for p in peerings}


def test_unloading_in_a_batch_ends_sas_and_tolerates_none(charon, backend):
    peerings = peerings_of(2)
    for p in peerings:
        backend.apply(LoadConn(p))
    charon.establish(peerings[0].conn_name, "9", {})
    reported = []
    backend.apply_chains([[UnloadConn(p.conn_name)] for p in peerings],
                         lambda action, error: reported.append((action, error)))
    assert [error for _, error in reported] == [None, None]
    assert charon.conns == {} and charon.sas == {}


def test_a_scoped_look_at_many_connections_is_pipelined_and_the_session_stays_usable(charon, tmp_path):
    adapter = StrongSwanBackend(f"unix://{charon.path}", timeout=2, pipeline_window=4)
    peerings = peerings_of(6)
    adapter.apply_chains([[LoadConn(p)] for p in peerings], lambda action, error: None)
    charon.establish(peerings[1].conn_name, "3", {peerings[1].children[0][0]: "INSTALLED"})
    wanted = [p.conn_name for p in peerings[:4]]
    observed = adapter.observe(wanted)
    assert set(observed.conns) == set(wanted)
    assert set(observed.sas) == {peerings[1].conn_name}
    assert observed.sas_of(peerings[1].conn_name)[0].installed_children == (peerings[1].children[0][0],)
    adapter.apply(UnloadConn(peerings[5].conn_name))  # replies are not out of step afterwards
    assert peerings[5].conn_name not in charon.conns
    adapter.close()


def test_a_look_at_sas_lists_the_sas_alone_scoped_or_all(charon, tmp_path):
    """What an SA event needs: neither list-conns nor get-shared (the full look's), which cost both
    charons and both monitors most of an establishment burst's listings (bench/README.md)."""
    adapter = StrongSwanBackend(f"unix://{charon.path}", timeout=2, pipeline_window=4)
    peerings = peerings_of(6)
    adapter.apply_chains([[LoadConn(p)] for p in peerings], lambda action, error: None)
    charon.establish(peerings[1].conn_name, "3", {peerings[1].children[0][0]: "INSTALLED"})
    charon.establish(peerings[4].conn_name, "4", {})
    charon.requests.clear()
    scoped = adapter.observe_sas([p.conn_name for p in peerings[:4]])
    assert set(scoped) == {peerings[1].conn_name}
    assert scoped[peerings[1].conn_name][0].installed_children == (peerings[1].children[0][0],)
    assert set(charon.requests) == {"list-sas"} and len(charon.requests) == 4  # one per connection
    charon.requests.clear()
    everything = adapter.observe_sas(None)
    assert set(everything) == {peerings[1].conn_name, peerings[4].conn_name}
    assert charon.requests == ["list-sas"]
    adapter.apply(UnloadConn(peerings[5].conn_name))  # replies are not out of step afterwards
    assert peerings[5].conn_name not in charon.conns
    adapter.close()


def test_a_chain_under_way_goes_on_before_new_chains_start(charon):
    """Each connection's secret, connection and initiation, in that order, and the first
    connection initiated long before the last one is loaded: the burst's first IKE SAs start while
    the others load, and the initiations leave at the pace charon answers, not all at once."""
    adapter = StrongSwanBackend(f"unix://{charon.path}", timeout=2, pipeline_window=2)
    peerings = peerings_of(6)
    adapter.apply_chains([[LoadSecret(p), LoadConn(p), Initiate(p.conn_name, p.children[0][0])] for p in peerings],
                         lambda action, error: None)
    requests = [r for r in charon.requests if r in ("load-shared", "load-conn", "initiate")]
    assert requests.count("initiate") == 6
    assert requests.index("initiate") < 6  # not after all 12 loads
    assert max(i for i, r in enumerate(requests) if r == "load-shared") > requests.index("initiate")
    adapter.close()
