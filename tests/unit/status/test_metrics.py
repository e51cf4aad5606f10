"""Metrics: valid Prometheus text, the per-tunnel and per-daemon series, and the history behind them."""

from __future__ import annotations

import re
import urllib.request

import pytest

from testsupport.builders import desired, row
from ovs_ipsec.backends.strongswan.backend import StrongSwanBackend
from ovs_ipsec.errors import OvsIpsecError
from ovs_ipsec.model import GlobalConfig, ObservedSA, ObservedState
from ovs_ipsec.planner import group_peerings
from ovs_ipsec.status.metrics import MetricsServer, parse_address, render_metrics
from ovs_ipsec.status.snapshot import CertificateStatus, ReconcileStats, StatusSnapshot, build_snapshot
from ovs_ipsec.validate import CertificateFacts, validate

PSK = "Sup3rS3cretPSK"
GNV = row("gnv0", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", psk=PSK)
GRE = row("gre0", "gre", local_ip="10.0.0.1", remote_ip="10.0.0.3", psk=PSK)
BAD = row("bad", "geneve", local_ip="10.0.0.1", remote_ip="nowhere", psk=PSK)

# The exposition format, strictly: comments, then `name{label="value",...} number`.
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*"'
                    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*")*)?\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$')


def snapshot(*rows, up=(), age=3, previous=None, now=1000.0, errors=(), **extra):
    validated = validate(desired(*rows), CertificateFacts(), now)
    peerings, _ = group_peerings(validated.tunnels, StrongSwanBackend.naming)
    conns = {name: frozenset(c for c, _ in p.children) for name, p in peerings.items()}
    sas = {}
    for name, peering in peerings.items():
        if peering.tunnels[0].name in dict(up):
            children = tuple(child for child, _ in peering.children)
            sas[name] = (ObservedSA(name, dict(up)[peering.tunnels[0].name], "ESTABLISHED", age, children),)
    failing = {name: "charon refused" for name, p in peerings.items() if p.tunnels[0].name in errors}
    return build_snapshot(validated, peerings, ObservedState(conns, frozenset(), sas), failing, None, GlobalConfig(),
                          previous or StatusSnapshot.empty(), now, **extra)


def samples(text):
    """{(name, frozenset(labels)): value}, checking every line on the way."""
    result = {}
    declared = set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            declared.add(line.split()[2])
            continue
        match = SAMPLE.match(line)
        assert match, f"not a valid sample line: {line!r}"
        name = match.group(1)
        assert any(name == d or name.startswith(d + "_") for d in declared), f"{name} has no HELP/TYPE"
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:\\.|[^"\\])*)"', match.group(3) or ""))
        result[(name, labels)] = float(line.rsplit(" ", 1)[1])
    return result


def value(parsed, name, **labels):
    matches = [v for (n, ls), v in parsed.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_per_tunnel_series():
    current = snapshot(GNV, GRE, BAD, up=[("gnv0", "5")], age=30, now=1000)
    parsed = samples(render_metrics(current, queue_depth=4, now=1010))
    assert value(parsed, "ovs_ipsec_tunnel_state", tunnel="gnv0", state="established") == 1
    assert value(parsed, "ovs_ipsec_tunnel_state", tunnel="gnv0", state="loaded") == 0
    assert value(parsed, "ovs_ipsec_tunnel_state", tunnel="gre0", state="loaded") == 1
    assert value(parsed, "ovs_ipsec_tunnel_state", tunnel="bad", state="invalid") == 1
    assert value(parsed, "ovs_ipsec_tunnel_ike_sas", tunnel="gnv0", peer="10.0.0.2") == 1
    assert value(parsed, "ovs_ipsec_tunnel_child_sas", tunnel="gnv0") == 2
    assert value(parsed, "ovs_ipsec_tunnel_established_seconds", tunnel="gnv0") == 40  # 30 s old at 1000, now 1010
    assert not [k for k in parsed if k[0] == "ovs_ipsec_tunnel_established_seconds" and ("tunnel", "gre0") in k[1]]
    assert value(parsed, "ovs_ipsec_tunnel_info", tunnel="gnv0", type="geneve", auth="psk") == 1
    assert value(parsed, "ovs_ipsec_tunnels", state="established") == 1
    assert value(parsed, "ovs_ipsec_reconcile_queue_depth") == 4


def test_daemon_series_and_certificates():
    stats = ReconcileStats().after_pass(0.25, 900.0, 2).after_pass(0.5, 990.0, 1)
    certificate = CertificateStatus("/etc/ipsec/host\"1\"-cert.pem", "local", "host1", 2_000_000_000.0, None)
    parsed = samples(render_metrics(snapshot(GNV, reconcile=stats, certificates=(certificate,)), 0, 1000))
    assert value(parsed, "ovs_ipsec_reconcile_duration_seconds_sum") == 0.75
    assert value(parsed, "ovs_ipsec_reconcile_duration_seconds_count") == 2
    assert value(parsed, "ovs_ipsec_reconcile_last_duration_seconds") == 0.5
    assert value(parsed, "ovs_ipsec_reconcile_retry_waiting") == 1
    assert value(parsed, "ovs_ipsec_last_full_resync_timestamp_seconds") == 990
    assert value(parsed, "ovs_ipsec_ike_daemon_up") == 1
    assert value(parsed, "ovs_ipsec_certificate_expiry_timestamp_seconds", path='/etc/ipsec/host\\"1\\"-cert.pem',
                 role="local", cn="host1") == 2_000_000_000


def test_empty_status_is_still_valid_text():
    parsed = samples(render_metrics(StatusSnapshot.empty(), 0, 0))
    assert value(parsed, "ovs_ipsec_tunnels", state="established") == 0
    assert not [k for k in parsed if k[0] == "ovs_ipsec_last_full_resync_timestamp_seconds"]


def test_no_secret_in_metrics():
    assert PSK not in render_metrics(snapshot(GNV, GRE, BAD, up=[("gnv0", "5")]), 0, 1000)


def test_history_counts_rekeys_failures_and_keeps_the_established_time():
    first = snapshot(GNV, up=[("gnv0", "5")], age=30, now=1000)
    assert first.tunnels[0].established_at == 970 and first.tunnels[0].rekeys == 0
    # The same SA seen again later (perhaps from a stale cache): its established time does not move.
    again = snapshot(GNV, up=[("gnv0", "5")], age=30, previous=first, now=1100)
    assert again.tunnels[0].established_at == 970
    rekeyed = snapshot(GNV, up=[("gnv0", "6")], age=1, previous=again, now=1200)
    assert rekeyed.tunnels[0].rekeys == 1 and rekeyed.tunnels[0].established_at == 1199
    down = snapshot(GNV, previous=rekeyed, now=1300)
    assert down.tunnels[0].failures == 1 and down.tunnels[0].established_at is None
    failing = snapshot(GNV, errors=("gnv0",), previous=down, now=1400)
    still = snapshot(GNV, errors=("gnv0",), previous=failing, now=1500)
    assert (failing.tunnels[0].failures, still.tunnels[0].failures) == (2, 2)
    back = snapshot(GNV, up=[("gnv0", "9")], previous=still, now=1600)
    assert back.tunnels[0].rekeys == 1  # coming back up is not a rekey


def test_parse_address():
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)  # loopback unless an address is named
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", "host:http", "host:70000", "host:²", "host:9464\n"):
        with pytest.raises(OvsIpsecError):
            parse_address(bad)


def test_server_serves_the_text_on_loopback():
    server = MetricsServer(("127.0.0.1", 0))
    server.start(lambda: "ovs_ipsec_ike_daemon_up 1\n")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert reply.read() == b"ovs_ipsec_ike_daemon_up 1\n"
    finally:
        server.close()


def test_the_metrics_server_drops_idle_clients_and_caps_connections(monkeypatch):
    import socket
    import time

    from ovs_ipsec.status import metrics

    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.5)
    server = MetricsServer(("127.0.0.1", 0))
    server.start(lambda: "ovs_ipsec_up 1\n")
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(metrics.MAX_CONNECTIONS)]
        over = socket.create_connection(("127.0.0.1", server.port))
        over.settimeout(2)
        assert over.recv(1) == b""  # over the cap: closed at once
        time.sleep(1.0)  # the idle ones time out and free their slots
        for sock in idle:
            sock.settimeout(2)
            assert sock.recv(1) == b""
        client = socket.create_connection(("127.0.0.1", server.port))
        client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        client.settimeout(2)
        assert b"ovs_ipsec_up 1" in client.makefile("rb").read()
    finally:
        server.close()


def test_label_values_from_ovsdb_cannot_break_the_exposition_format():
    from ovs_ipsec.status.metrics import _escape

    assert _escape('a"b\\c\nd\x1b[31m') == 'a\\"b\\\\c\\nd\\\\x1b[31m'
