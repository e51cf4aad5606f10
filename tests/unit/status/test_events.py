"""Events: one per change, logfmt a person can read and a machine can parse, JSON lines, no secrets."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

from testsupport.builders import desired, row
from ovs_ipsec.backends.strongswan.backend import StrongSwanBackend
from ovs_ipsec.model import GlobalConfig, ObservedSA, ObservedState, TunnelState
from ovs_ipsec.planner import group_peerings
from ovs_ipsec.status.events import Event, EventLog, events_between, json_line, logfmt
from ovs_ipsec.status.snapshot import CertificateStatus, StatusSnapshot, build_snapshot
from ovs_ipsec.validate import CertificateFacts, validate

PSK = "Sup3rS3cretPSK"
GNV = row("gnv0", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk=PSK)
BAD = row("bad", "geneve", local_ip="10.0.0.1", remote_ip="not-an-address", psk=PSK)
DAY = 86400.0


def snapshot(*rows, sas=(), loaded=True, errors=None, previous=None, now=1000.0, certificates=(), children=True):
    """`sas`: unique ids of established IKE SAs; `children`: whether they carry the tunnels' child SAs."""
    validated = validate(desired(*rows), CertificateFacts(), now)
    peerings, _ = group_peerings(validated.tunnels, StrongSwanBackend.naming)
    conns = {name: frozenset(c for c, _ in p.children) for name, p in peerings.items()} if loaded else {}
    observed = ObservedState(conns, frozenset(), {
        name: tuple(ObservedSA(name, uid, "ESTABLISHED", 3, tuple(c for c, _ in p.children) if children else ())
                    for uid in sas) for name, p in peerings.items()} if sas else {})
    errors = {name: errors for name in peerings} if errors else {}
    return build_snapshot(validated, peerings, observed, errors, None, GlobalConfig(),
                          previous or StatusSnapshot.empty(), now, certificates=certificates)


def kinds(events):
    return [event.kind for event in events]


def test_a_tunnel_coming_up_is_one_event_with_where_it_came_from():
    loaded = snapshot(GNV)
    up = snapshot(GNV, sas=["7"], previous=loaded, now=1010)
    assert kinds(events_between(StatusSnapshot.empty(), loaded, 1000)) == ["tunnel_loaded"]
    event, all_up = events_between(loaded, up, 1010)
    assert event.kind == "tunnel_up" and not event.warning and all_up.kind == "all_tunnels_encrypting"
    line = logfmt(event)
    assert line.startswith("event=tunnel_up tunnel=gnv0 state=established from=loaded peer=10.0.0.2 ")
    assert "conn=ovsipsec-" in line and "since=1970-01-01T00:16:50Z" in line and "ike_sas=1" in line
    assert events_between(up, snapshot(GNV, sas=["7"], previous=up, now=1020), 1020) == ()  # nothing changed


def test_an_ike_sa_without_child_sas_is_negotiating_not_up():
    loaded = snapshot(GNV)
    ike_only = snapshot(GNV, sas=["7"], children=False, previous=loaded, now=1010)
    (event,) = events_between(loaded, ike_only, 1010)
    assert event.kind == "tunnel_negotiating"
    (tunnel,) = ike_only.tunnels
    assert tunnel.state is TunnelState.NEGOTIATING and not tunnel.encrypting
    assert tunnel.reason == ("the IKE SA is up; 0 of 2 child SAs installed, so the tunnel's traffic is not "
                             "encrypted yet")
    up = snapshot(GNV, sas=["7"], previous=ike_only, now=1020)
    assert up.tunnels[0].encrypting and kinds(events_between(ike_only, up, 1020)) == [
        "tunnel_up", "all_tunnels_encrypting"]


def test_all_tunnels_encrypting_is_one_line_when_it_starts_and_one_when_it_stops():
    other = row("gnv1", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.3", psk=PSK)
    one_up = snapshot(GNV, row("gnv1", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.3", psk=PSK), sas=["7"])
    assert "all_tunnels_encrypting" in kinds(events_between(StatusSnapshot.empty(), one_up, 1000))
    (line,) = [logfmt(e) for e in events_between(StatusSnapshot.empty(), one_up, 1000)
               if e.kind == "all_tunnels_encrypting"]
    assert line == ('event=all_tunnels_encrypting tunnels=2 message="Connections for all(2) configured tunnels '
                    'are Up: all 2 configured tunnels are encrypting"')
    down = snapshot(GNV, other, previous=one_up, now=1010)
    (stopped,) = [e for e in events_between(one_up, down, 1010) if e.kind == "not_all_tunnels_encrypting"]
    assert stopped.warning and dict(stopped.fields)["not_encrypting"] == "gnv0,gnv1"
    assert "all_tunnels_encrypting" not in kinds(events_between(one_up, snapshot(GNV, other, sas=["7"],
                                                                                   previous=one_up), 1020))


def test_losing_the_sa_is_a_down_event_and_a_warning():
    up = snapshot(GNV, sas=["7"])
    event, not_all = events_between(up, snapshot(GNV, previous=up, now=1010), 1010)
    assert not_all.kind == "not_all_tunnels_encrypting"
    assert event.kind == "tunnel_down" and event.warning
    assert "from=established" in logfmt(event)


def test_invalid_and_error_are_reported_once_each_with_their_reason():
    invalid = snapshot(BAD)
    (event,) = events_between(StatusSnapshot.empty(), invalid, 1000)
    assert event.kind == "tunnel_invalid" and event.warning
    assert re.search(r'reason="[^"]*not-an-address[^"]*"', logfmt(event))
    assert events_between(invalid, snapshot(BAD, previous=invalid), 1000) == ()

    error = snapshot(GNV, errors="charon refused load-conn: bad proposal")
    assert kinds(events_between(StatusSnapshot.empty(), error, 1000)) == ["tunnel_error"]
    other = snapshot(GNV, errors="charon did not answer", previous=error)
    assert kinds(events_between(error, other, 1000)) == ["tunnel_error"]  # a new reason is news


def test_removal_and_rekey():
    up = snapshot(GNV, sas=["7"])
    rekeyed = snapshot(GNV, sas=["8"], previous=up, now=1010)
    assert rekeyed.tunnels[0].rekeys == 1
    (event,) = events_between(up, rekeyed, 1010)
    assert event.kind == "tunnel_rekeyed" and "rekeys=1" in logfmt(event)
    (event,) = events_between(rekeyed, snapshot(previous=rekeyed), 1020)
    assert logfmt(event) == "event=tunnel_removed tunnel=gnv0 from=established peer=10.0.0.2 conn=" + \
        rekeyed.tunnels[0].conn


def test_certificate_near_expiry_is_reported_once():
    soon = CertificateStatus("/etc/ipsec/host-cert.pem", "local", "host", 1000 + 10 * DAY, None)
    later = CertificateStatus("/etc/ipsec/ca.pem", "ca", "CA", 1000 + 400 * DAY, None)
    first = snapshot(certificates=(soon, later))
    (event,) = events_between(StatusSnapshot.empty(), first, 1000)
    assert event.kind == "certificate_expiring" and event.warning
    assert logfmt(event) == ("event=certificate_expiring path=/etc/ipsec/host-cert.pem role=local cn=host "
                             "not_after=1970-01-11T00:16:40Z days_left=10.0")
    assert events_between(first, snapshot(certificates=(soon, later), previous=first, now=1060), 1060) == ()
    renewed = replace(soon, not_after=1000 + 5 * DAY)  # a new file, still short: say so again
    assert kinds(events_between(first, snapshot(certificates=(renewed,), now=1060), 1060)) == ["certificate_expiring"]


def test_logfmt_quotes_what_needs_quoting_and_json_lines_parse():
    event = Event("tunnel_error", 0.0, (("tunnel", "a b"), ("reason", 'say "hi"=now'), ("peer", "fd00::2"),
                                        ("skipped", None), ("up", True)))
    assert logfmt(event) == r'event=tunnel_error tunnel="a b" reason="say \"hi\"=now" peer=fd00::2 up=true'
    assert json.loads(json_line(event)) == {"event": "tunnel_error", "at": "1970-01-01T00:00:00Z", "tunnel": "a b",
                                            "reason": 'say "hi"=now', "peer": "fd00::2", "up": True}


def test_no_secret_in_any_event(caplog, tmp_path):
    sequence = [snapshot(GNV, BAD)]
    sequence.append(snapshot(GNV, BAD, sas=["1"], previous=sequence[-1]))
    sequence.append(snapshot(GNV, BAD, sas=["2"], previous=sequence[-1]))
    sequence.append(snapshot(GNV, BAD, errors="charon refused", previous=sequence[-1]))
    sequence.append(snapshot(previous=sequence[-1]))
    path = tmp_path / "events.jsonl"
    sink = EventLog(logging.getLogger("test.events"), str(path))
    with caplog.at_level(logging.INFO, logger="test.events"):
        previous = StatusSnapshot.empty()
        for current in sequence:
            sink.emit(events_between(previous, current, 1000))
            previous = current
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == [
        "tunnel_invalid", "tunnel_loaded", "tunnel_up", "tunnel_rekeyed", "tunnel_error", "tunnel_removed",
        "tunnel_removed"]
    assert [record.getMessage() for record in caplog.records] == [logfmt(e) for e in _replay(sequence)]
    assert {record.levelno for record in caplog.records} == {logging.INFO, logging.WARNING}
    assert PSK not in path.read_text() and PSK not in caplog.text


def _replay(sequence):
    previous = StatusSnapshot.empty()
    for current in sequence:
        yield from events_between(previous, current, 1000)
        previous = current


def test_states_all_have_an_event():
    for state in TunnelState:
        status = replace(snapshot(GNV).tunnels[0], state=state, reason="x" if state in ("invalid", "error") else None)
        current = StatusSnapshot((status,), GlobalConfig(), None, 1000.0)
        assert len(events_between(StatusSnapshot.empty(), current, 1000)) == 1
