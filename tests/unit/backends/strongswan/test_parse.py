"""Parsing charon's replies (captured from strongSwan 5.9.8 over VICI)."""

from __future__ import annotations

import os
import socket

from ovs_ipsec.backends.strongswan import parse
from ovs_ipsec.backends.strongswan.backend import _peer_process

# list-sas event for an IKE SA whose first CHILD_SA was installed (the shape charon 5.9.8 sends).
LIST_SA_EVENT = {
    b"ovsipsec-gnv0-383e5afe2b": {
        b"uniqueid": b"1", b"version": b"2", b"state": b"ESTABLISHED", b"local-host": b"10.231.0.1",
        b"remote-host": b"10.231.0.2", b"initiator": b"yes", b"established": b"12",
        b"child-sas": {b"out-3": {b"name": b"out", b"uniqueid": b"3", b"state": b"INSTALLED", b"mode": b"TRANSPORT"},
                       b"in-4": {b"name": b"in", b"uniqueid": b"4", b"state": b"INSTALLING"}},
    },
}
FOREIGN_SA_EVENT = {b"myvpn-2": {b"uniqueid": b"7", b"state": b"ESTABLISHED", b"child-sas": {}}}


def _decoded(event):
    # python-vici hands back str keys with bytes values; mimic that.
    def walk(value):
        if isinstance(value, dict):
            return {k.decode(): walk(v) for k, v in value.items()}
        return value
    return walk(event)


def test_ike_sas_are_parsed_and_foreign_ones_ignored():
    sas = parse.ike_sas([_decoded(LIST_SA_EVENT), _decoded(FOREIGN_SA_EVENT)])
    (sa,) = sas["ovsipsec-gnv0-383e5afe2b"]
    assert (sa.unique_id, sa.state, sa.established_seconds, sa.installed_children) == ("1", "ESTABLISHED", 12, ("out",))
    assert "myvpn-2" not in sas


def test_owned_conns_and_secrets_filter_by_prefix():
    events = [{"ovsipsec-10.0.0.2-0123456789": {"children": {"gnv0-in-abc123": {}, "gnv0-out-abc123": {}}}},
              {"myvpn-2": {"children": {"net": {}}}}]
    assert parse.owned_conns(events) == {"ovsipsec-10.0.0.2-0123456789": frozenset({"gnv0-in-abc123",
                                                                                      "gnv0-out-abc123"})}
    assert parse.owned_secrets({"keys": [b"ovsipsec-10.0.0.2-0123456789", b"myvpn"]}) == frozenset(
        {"ovsipsec-10.0.0.2-0123456789"})


def test_event_conn_names():
    assert parse.event_conn_names(_decoded(LIST_SA_EVENT)) == frozenset({"ovsipsec-gnv0-383e5afe2b"})


def test_the_daemon_at_the_other_end_of_the_socket_is_named_by_pid_and_start_time():
    # A restart is detected by this id changing: it must be stable for one process (charon's own
    # `stats` uptime.since is not: it is recomputed from the clock and jitters by a second).
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        first = _peer_process(ours)
        assert first == _peer_process(ours) and first.startswith(f"{os.getpid()}@")
        assert "?" not in first
