"""Hostile rows through the whole pipeline; every output is read back by the program that consumes it."""

from __future__ import annotations

import base64
import re
import subprocess

import vici.protocol
from hypothesis import given
from hypothesis import strategies as st

from testsupport.strategies import rows, skb_marks
from testsupport.builders import desired
from ovs_ipsec.backends.libreswan import render as lsw
from ovs_ipsec.backends.strongswan import render as sw
from ovs_ipsec.guard.policy import guard_policies, plan_changes
from ovs_ipsec.guard.xfrm import XfrmPolicyInstaller, batch_commands
from ovs_ipsec.model import DesiredState, GlobalConfig
from ovs_ipsec.planner import group_peerings
from ovs_ipsec.runner import run
from ovs_ipsec.status.render import render_show, render_table
from ovs_ipsec.validate import CertificateFacts, validate
from ovs_ipsec.validate.fields import NAME_PATTERN
from testsupport.pluto import LIBRESWAN_ROOT

READWRITECONF = f"{LIBRESWAN_ROOT}/usr/libexec/ipsec/readwriteconf"
STYLES = (lsw.Style(major=4), lsw.Style(major=5), lsw.Style(major=4, default_crypto=True))
SECRET_LINE = re.compile(r"(?:%any|[0-9a-f.:]*[0-9a-f.]) [0-9a-f.:]*[0-9a-f.] : PSK 0s[A-Za-z0-9+/]+={0,2}")


def peerings_of(state: DesiredState, naming):
    validated = validate(state, CertificateFacts(), 0)
    return validated, group_peerings(validated.tunnels, naming)[0]


def sections(readwriteconf_output: str) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    current = None
    for line in readwriteconf_output.splitlines():
        if line.startswith("conn "):
            current = found.setdefault(line[5:], {})
        elif line.startswith("\t") and current is not None and "=" in line:
            key, _, value = line[1:].partition("=")
            current.setdefault(key, value)
    return found


@given(rows, st.sampled_from(STYLES))
def test_pluto_parses_every_file_we_render_into_exactly_our_sections(count, tmp_path_factory, found_rows, style):
    count("libreswan-conf")
    _validated, peerings = peerings_of(desired(*found_rows), lsw.naming(style))
    path = tmp_path_factory.getbasetemp() / "fuzz.conf"
    for peering in peerings.values():
        count("libreswan-conf files")
        path.write_text("config setup\n    logtime=yes\n" + lsw.conn_file(peering, style))
        result = run([READWRITECONF, "--config", str(path)], timeout=10)
        parsed = sections(result.stdout)
        assert set(parsed) == set(lsw.pluto_names(peering))
        first = peering.tunnels[0]
        for name, keys in parsed.items():
            assert not {"leftupdown", "rightupdown", "also", "leftsubnet", "rightsubnet"} & set(keys)
            if "Invalid ike value" in result.stderr or "Invalid esp value" in result.stderr:
                continue  # an algorithm of strongSwan's dialect: pluto refuses the value, not the structure
            assert keys["left"] == (first.local_ip or "%defaultroute") and keys["right"] == first.remote_ip


@given(rows)
def test_every_secrets_file_is_one_line_that_pluto_loads_without_complaint(count, pluto, found_rows):
    count("libreswan-secrets")
    _validated, peerings = peerings_of(desired(*found_rows), lsw.naming(lsw.Style()))
    folder = pluto.root / "etc/ipsec.d"
    for old in folder.glob("*.secrets"):
        old.unlink()
    for peering in peerings.values():
        if peering.secret_id:
            count("libreswan-secrets files")
            text = lsw.secrets_file(peering)
            (line,) = text.splitlines()[1:]
            assert SECRET_LINE.fullmatch(line)
            assert base64.b64decode(line.split(" 0s", 1)[1]).decode() == peering.psk
            (folder / f"{peering.secret_id}.secrets").write_text(text)
    answer = pluto.whack("--rereadsecrets")
    assert all(line.startswith(("002 loading secrets from ", "002 no secrets filename matched ",
                                "002 forgetting secrets"))
               for line in answer.splitlines()), answer


@given(rows)
def test_every_vici_message_round_trips_through_vicis_own_encoder(count, found_rows):
    count("vici")
    _validated, peerings = peerings_of(desired(*found_rows), sw_naming())
    for peering in peerings.values():
        count("vici messages")
        message = sw.render_conn(peering)
        decoded = vici.protocol.Message.deserialize(vici.protocol.FiniteStream(vici.protocol.Message.serialize(message)))
        assert _texts(decoded) == _texts(message)
        (name,) = decoded
        assert _bytes(name) == peering.conn_name.encode() and set(map(_bytes, decoded[name]["children"])) == {
            child.encode() for child, _ in peering.children}


@given(rows, skb_marks)
def test_guard_batches_are_exactly_the_intended_ip_commands(count, guard_netns, found_rows, mark):
    count("guard")
    validated = validate(desired(*found_rows, **({"skb_mark": mark} if mark else {})), CertificateFacts(), 0)
    guard = validated.guard
    wanted = guard_policies(guard.mark, validated.tunnels, guard.traffic)
    installer = XfrmPolicyInstaller(run=lambda argv, **kw: run(["ip", "netns", "exec", guard_netns, *argv], **kw))
    subprocess.run(["ip", "-n", guard_netns, "xfrm", "policy", "flush"], check=True)
    installer.run_batch(batch_commands(plan_changes(wanted, ()), ()))
    installed = installer.policies()
    assert plan_changes(wanted, installed).converged
    count("guard policies", len(wanted))
    assert {p.as_guard_policy() for p in installed if p.owned} == set(wanted)


@given(rows, skb_marks)
def test_status_output_is_printable_whatever_the_rows_say(count, found_rows, mark):
    count("status")
    from ovs_ipsec.model import ObservedState
    from ovs_ipsec.status.snapshot import StatusSnapshot, build_snapshot

    validated, peerings = peerings_of(desired(*found_rows, **({"skb_mark": mark} if mark else {})), sw_naming())
    snapshot = build_snapshot(validated, peerings, ObservedState({}, frozenset(), {}), {}, None,
                              GlobalConfig(skb_mark=mark), StatusSnapshot.empty(), 0)
    for text in (render_show(snapshot), render_table(snapshot.as_json(), 0)):
        assert all(line.isprintable() for line in text.splitlines())
    for tunnel in validated.tunnels:
        assert NAME_PATTERN.fullmatch(tunnel.name)


def sw_naming():
    from ovs_ipsec.backends.strongswan.backend import StrongSwanBackend

    return StrongSwanBackend.naming


def _texts(value):
    """VICI carries bytes: compare the message as bytes whatever the types we built it with."""
    if isinstance(value, dict):
        return {_bytes(k): _texts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_texts(v) for v in value]
    return _bytes(value)


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
