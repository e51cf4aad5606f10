"""Parsing charon's replies (captured from strongSwan 5.9.8 and 6.0.1 over VICI)."""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import asdict

import pytest

from testsupport.golden import GOLDEN_DIR, assert_golden
from ovs_ipsec.backends.strongswan import parse, render
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


# -- captured replies (lab/run.sh --golden: Debian 12's charon 5.9.8, Debian 13's 6.0.1) -------------

VERSIONS = ["5.9.8", "6.0.1"]


def _as_vici(value):
    """A captured reply as python-vici returns it: str keys, bytes values (JSON kept them as str)."""
    if isinstance(value, dict):
        return {k: _as_vici(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_vici(v) for v in value]
    return value.encode()


def captured(version: str, what: str):
    path = GOLDEN_DIR / f"strongswan_{version}_{what}"
    if path.suffix == ".jsonl":
        return [{k: _as_vici(v) if k == "message" else v for k, v in json.loads(line).items()}
                for line in path.read_text().splitlines()]
    return _as_vici(json.loads(path.read_text()))


def parsed(version: str) -> dict:
    """Everything the backend reads from one charon, through the project's parsers."""
    def sas(reply):
        return {name: [asdict(sa) for sa in found] for name, found in parse.ike_sas(reply).items()}

    return {
        "version": parse.text(captured(version, "version.json")["version"]),
        "conns": {name: sorted(children) for name, children
                  in parse.owned_conns(captured(version, "list_conns.json")).items()},
        "ike_sas_initiator": sas(captured(version, "list_sas_initiator.json")),
        "ike_sas_responder": sas(captured(version, "list_sas_responder.json")),
        "secrets": sorted(parse.owned_secrets(captured(version, "get_shared.json"))),
        "events": [[event["event"], sorted(parse.event_conn_names(event["message"]))]
                   for event in captured(version, "events.jsonl")],
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_captured_replies_parse_to_golden(version):
    assert_golden(f"strongswan_{version}.parsed.json", json.dumps(parsed(version), indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize("version", VERSIONS)
def test_captured_tunnel_is_established_with_both_children_installed(version):
    """A CA-signed VXLAN tunnel carrying ESP: one IKE SA per side with the tunnel's in and out
    children installed (list-sas), the same children loaded (list-conns), our PSK id alone in
    get-shared, and events that name only our connection."""
    result = parsed(version)
    ((conn, children),) = result["conns"].items()
    assert [re.sub(r"-[0-9a-f]{6}$", "", child) for child in children] == ["tun-in", "tun-out"]
    for side in ("initiator", "responder"):
        ((name, (sa,)),) = result[f"ike_sas_{side}"].items()
        assert sa["state"] == "ESTABLISHED" and sorted(sa["installed_children"]) == children
    assert result["ike_sas_initiator"].keys() == {conn}
    assert [re.sub(r"-[0-9a-f]{10}$", "", secret) for secret in result["secrets"]] == ["ovsipsec-10.0.0.2"]
    assert [kind for kind, _ in result["events"]] == ["ike-updown", "child-updown", "child-updown"]
    assert all(len(names) == 1 and names[0].startswith("ovsipsec-10.0.0.2-") for _, names in result["events"])


def test_6_0_replies_have_the_shape_of_5_9():
    """What changed between the two captures is values (names, SPIs, times), not the layout the
    parsers read: every key path of 5.9.8's replies is in 6.0.1's, and the other way round."""
    def paths(value, prefix=""):
        found = set()
        if isinstance(value, dict):
            for key, item in value.items():
                key = re.sub(r"^(?:ovsipsec-.*|tun-(?:in|out)-[0-9a-f]{6}(?:-\d+)?)$", "<name>", key)
                found |= {f"{prefix}/{key}"} | paths(item, f"{prefix}/{key}")
        elif isinstance(value, list):
            for item in value:
                found |= paths(item, f"{prefix}[]")
        return found

    for what in ("version.json", "list_sas_initiator.json", "list_sas_responder.json", "list_conns.json",
                 "get_shared.json", "events.jsonl"):
        old, new = (paths(captured(version, what)) for version in VERSIONS)
        assert old == new, what


@pytest.mark.parametrize("version", VERSIONS)
def test_captured_events_tell_what_a_listing_would(version):
    """charon's own ike-updown and child-updown events, in their order, carried into the observation
    cache: the tunnel's IKE SA up with both children installed, as list-sas shows it, so the monitor
    need not ask (bench/README.md, Establishment)."""
    from ovs_ipsec.daemon.observation import ObservationCache
    from testsupport.fakes import FakeBackend

    cache = ObservationCache(FakeBackend())
    for event in captured(version, "events.jsonl"):
        cache.apply_events(parse.event_sas(event["event"], event["message"]))
    listed = parse.ike_sas(captured(version, "list_sas_initiator.json"))  # (another tunnel's capture)

    def shape(sas):
        return [(sa.state, sa.established_seconds is not None, len(sa.installed_children))
                for found in sas.values() for sa in found]
    assert shape(cache.state.sas) == shape(listed) == [("ESTABLISHED", True, 2)]
    (name, (sa,)), = cache.state.sas.items()
    assert {render.child_owner(child) for child in sa.installed_children} == {"tun"}


def test_events_that_do_not_say_it_all_are_left_to_a_look():
    sa = {"uniqueid": b"4", "state": b"ESTABLISHED"}
    child = {"child-sas": {"c-9": {"name": b"ovsipsec-c", "state": b"INSTALLED"}}}
    assert parse.event_sas("ike-updown", {"ovsipsec-x": sa}) == (parse.SaEvent("ovsipsec-x", "4"),)  # gone
    assert parse.event_sas("ike-updown", {"up": b"yes", "operator-vpn": sa}) == ()  # not ours
    assert parse.event_sas("child-updown", {"ovsipsec-x": {**sa, **child}}) == ()  # a child down: look
    assert parse.event_sas("child-rekey", {"ovsipsec-x": {**sa, **child}}) == ()
    (up,) = parse.event_sas("child-updown", {"up": b"yes", "ovsipsec-x": {**sa, **child}})
    assert up.installed_child == "ovsipsec-c" and up.up is not None and up.up.established
