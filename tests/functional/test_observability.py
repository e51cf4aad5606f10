"""What an operator relies on: status written back to OVSDB, metrics, events, the status table.

Two hosts with real ovsdb-server and charon; host a's monitor serves metrics on its namespace's
loopback and writes an events file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from testsupport.tunnels import add_pair
from testsupport.procs import wait_for

PSK = "Sup3rS3cretPSK"
METRICS = "127.0.0.1:9464"
STATUS_KEYS = ("ipsec_state", "ipsec_reason", "ipsec_since", "ipsec_last_good_since")
README_JSON_KEYS = {"name", "type", "local_ip", "remote_ip", "auth", "state", "reason", "ike_sas", "child_sas"}


@pytest.fixture
def hosts(sandbox):
    a = sandbox.add_host("a", "10.234.0.1/24")
    b = sandbox.add_host("b", "10.234.0.2/24")
    for host in (a, b):
        host.start_ovsdb()
        host.start_charon()
    a.start_monitor(f"--metrics-address={METRICS}", f"--events-file={a.workdir}/events.jsonl")
    b.start_monitor()
    return a, b


def external_ids(host, name) -> dict[str, str]:
    reply = json.loads(host.vsctl("--format=json", "--columns=external_ids", "find", "Interface", f"name={name}"))
    (row,) = reply["data"]
    return dict(row[0][1])


def ours(host, name) -> dict[str, str]:
    return {key: value for key, value in external_ids(host, name).items() if key in STATUS_KEYS}


def wait_written(host, name, state, timeout=5.0) -> dict[str, str]:
    return wait_for(lambda: (keys := ours(host, name)).get("ipsec_state") == state and keys, timeout, interval=0.02,
                    what=f"external_ids:ipsec_state={state} on {host.name}'s {name} (now {ours(host, name)})")


def status_writes(host) -> int:
    """Transactions of ours in the database's log (each carries our comment)."""
    log = subprocess.run(["ovsdb-tool", "-m", "show-log", f"{host.workdir}/conf.db"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return log.count("ovs-monitor-ipsec: tunnel IPsec status")


def scrape(host) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read().decode())"
    return subprocess.run(host.netns(sys.executable, "-c", code), capture_output=True, text=True, check=True,
                          timeout=30).stdout


def test_status_is_written_back_to_the_interface_row_with_only_our_keys(hosts):
    a, b = hosts
    add_pair(a, b, "tun", "geneve", psk=PSK)
    # Keys of other writers (an operator, ovn-controller) on the same row.
    a.vsctl("set", "Interface", "tun", "external_ids:owner=operator", "external_ids:ovn-chassis-id=b@10.234.0.2")
    keys = wait_written(a, "tun", "negotiating", timeout=30)
    assert keys["ipsec_since"].endswith("Z") and keys["ipsec_reason"].startswith("the IKE SA is up; 0 of 2 ")
    wait_written(b, "tun", "negotiating")

    # Only when a value changed: status republished without a change writes nothing.
    writes = status_writes(a)
    a.appctl("refresh")
    a.appctl("refresh")
    time.sleep(1)
    assert status_writes(a) == writes

    # Within a second of a change, and another writer's concurrent change survives ours.
    started = time.monotonic()
    a.vsctl("set", "Interface", "tun", "options:remote_name=somebody", "external_ids:owner=someone-else")
    keys = wait_written(a, "tun", "invalid", timeout=5)
    assert time.monotonic() - started < 1.0, f"written {time.monotonic() - started:.2f} s after the change"
    assert "remote_name" in keys["ipsec_reason"] and keys["ipsec_last_good_since"].endswith("Z")
    assert external_ids(a, "tun")["owner"] == "someone-else"
    assert external_ids(a, "tun")["ovn-chassis-id"] == "b@10.234.0.2"

    # No longer an IPsec tunnel: our keys go, the others stay.
    a.vsctl("remove", "Interface", "tun", "options", "psk", "--", "remove", "Interface", "tun", "options", "remote_name")
    wait_for(lambda: not ours(a, "tun"), 1.0, interval=0.02, what="our keys removed from a plain tunnel")
    assert external_ids(a, "tun") == {"owner": "someone-else", "ovn-chassis-id": "b@10.234.0.2"}

    # The monitor leaving with cleanup takes its connections, and their status, along.
    a.vsctl("set", "Interface", "tun", f"options:psk={PSK}")
    wait_written(a, "tun", "negotiating", timeout=30)
    a.stop_monitor(cleanup=True)
    assert not ours(a, "tun")
    wait_written(b, "tun", "loaded")  # b's own view: the peer went away (a initiates, b waits for it)
    assert PSK not in json.dumps(external_ids(b, "tun"))


def test_metrics_events_and_the_status_table(hosts):
    a, b = hosts
    add_pair(a, b, "tun", "geneve", psk=PSK)
    add_pair(a, b, "bad", "gre", psk=PSK, remote_name="x")  # PSK with remote_name: invalid
    a.wait_ike_up("tun", timeout=30)

    scraped = scrape(a)
    assert 'ovs_ipsec_tunnel_state{tunnel="tun",peer="10.234.0.2",state="negotiating"} 1' in scraped
    assert 'ovs_ipsec_tunnel_state{tunnel="bad",peer="10.234.0.2",state="invalid"} 1' in scraped
    assert 'ovs_ipsec_tunnel_ike_sas{tunnel="tun",peer="10.234.0.2"} 1' in scraped
    for family in ("tunnel_rekeys_total", "tunnel_failures_total", "tunnel_established_seconds",
                   "reconcile_duration_seconds", "reconcile_queue_depth", "last_full_resync_timestamp_seconds"):
        assert f"# TYPE ovs_ipsec_{family} " in scraped
    shown = a.appctl("metrics/show")
    assert [line for line in shown.splitlines() if line.startswith("# TYPE")] == \
        [line for line in scraped.splitlines() if line.startswith("# TYPE")]
    # Off by default: b listens on no TCP port at all.
    assert ":9464" not in subprocess.run(b.netns("ss", "-ltn"), capture_output=True, text=True, timeout=10).stdout
    assert "ovs_ipsec_tunnel_state" in b.appctl("metrics/show")

    events = [json.loads(line) for line in (a.workdir / "events.jsonl").read_text().splitlines()]
    up = next(e for e in events if e["event"] == "tunnel_negotiating" and e["tunnel"] == "tun")
    assert up["peer"] == "10.234.0.2" and up["conn"].startswith("ovsipsec-") and up["since"].endswith("Z")
    assert any(e["event"] == "tunnel_invalid" and e["tunnel"] == "bad" and "remote_name" in e["reason"]
               for e in events)
    log = a.log_text()
    assert "event=tunnel_negotiating tunnel=tun state=negotiating from=" in log
    assert log.count("event=tunnel_invalid tunnel=bad ") == 1

    table = subprocess.run([sys.executable, "-m", "ovs_ipsec.cli.main", "status", f"--unixctl={a.unixctl}"],
                           capture_output=True, text=True, check=True, timeout=30).stdout
    header, bad, tun, summary = table.splitlines()[:4]
    assert header.split()[:7] == ["TUNNEL", "TYPE", "STATE", "PEER", "AUTH", "SAS", "SINCE"]
    assert tun.split()[:6] == ["tun", "geneve", "negotiating", "10.234.0.2", "psk", "1/0"]
    assert bad.split()[:5] == ["bad", "gre", "invalid", "10.234.0.2", "psk"] and "remote_name" in bad
    assert summary == "2 tunnels from 10.234.0.1: 1 negotiating, 1 invalid"
    status = json.loads(subprocess.run([sys.executable, "-m", "ovs_ipsec.cli.main", "status", "--json",
                                        f"--unixctl={a.unixctl}"], capture_output=True, text=True, check=True,
                                       timeout=30).stdout)
    assert all(README_JSON_KEYS <= set(tunnel) for tunnel in status["tunnels"])

    everything = scraped + shown + log + (a.workdir / "events.jsonl").read_text() + json.dumps(status) + table
    assert PSK not in everything


def test_a_certificate_near_its_end_is_an_event_and_a_metric(sandbox, tmp_path):
    pki = [sys.executable, "-m", "ovs_ipsec.cli.pki_main", "--dir", str(tmp_path / "pki")]
    for args in (["req", "short"], ["self-sign", "short", "--days", "10"]):
        subprocess.run([*pki, *args], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    a = sandbox.add_host("a", "10.234.0.1/24")
    a.start_ovsdb()
    a.start_charon()
    a.vsctl("set", "Open_vSwitch", ".", f"other_config:certificate={tmp_path}/short-cert.pem",
            f"other_config:private_key={tmp_path}/short-privkey.pem")
    a.start_monitor()
    line = wait_for(lambda: next((l for l in a.log_text().splitlines() if "event=certificate_expiring" in l), None),
                    10, what="a certificate_expiring event")
    assert f"path={tmp_path}/short-cert.pem role=local cn=short" in line and "days_left=" in line
    assert f'ovs_ipsec_certificate_expiry_timestamp_seconds{{path="{tmp_path}/short-cert.pem",role="local",cn="short"}}' \
        in a.appctl("metrics/show")
