"""pluto's output -> observed values, on captured 4.10 and 5.2 output and documented 5.x formats.

Inputs are golden files (libreswan_SOURCES.md says where each comes from); the parsed result
is compared with a golden JSON file, so a parser change shows up as a reviewable diff.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from testsupport.golden import GOLDEN_DIR, assert_golden, captured
from ovs_ipsec.backends.libreswan import parse, render


def read(name: str) -> str:
    return (GOLDEN_DIR / name).read_text()


def as_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=sorted) + "\n"


def observed_json(status: str, conn_files=(), secret_files=()) -> dict:
    observed = parse.observed(status, set(conn_files), set(secret_files))
    return {"conns": {k: sorted(v) for k, v in observed.conns.items()},
            "shared_secrets": sorted(observed.shared_secrets),
            "sas": {k: [asdict(sa) for sa in v] for k, v in observed.sas.items()}}


@pytest.mark.parametrize("text, expected", [
    ("libreswan_4.10_version.txt", (4, 10)),  # captured `ipsec --version` of Debian 12's package
    ("libreswan_5.2_version.txt", (5, 2)),    # and of Debian 13's, in the lab
    ("Libreswan 5.2\n", (5, 2)),
    ("Libreswan v5.3dr1\n", (5, 3)),
    ("Linux Libreswan 3.32 (netkey) on 5.10.0\n", (3, 32)),
    ("Linux strongSwan U5.9.8/K6.1.0\n", None),
    ("", None),
])
def test_version(text, expected):
    assert parse.version(read(text) if text.endswith(".txt") else text) == expected


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_captured_4_10_status(side):
    status = read(f"libreswan_4.10_status_{side}.txt")
    files = {parts[0] for name in parse.loaded_conns(status) if (parts := render.split_name(name))}
    result = {"loaded": sorted(parse.loaded_conns(status)),
              "states": [asdict(s) for s in parse.states(status)],
              "observed": observed_json(status, files, files)}
    assert_golden(f"libreswan_4.10_status_{side}.parsed.json", as_json(result))


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_captured_5_2_status(side):
    """Debian 13's pluto 5.2 in the lab (lab/run.sh --golden), a CA-signed VXLAN tunnel carrying ESP."""
    status = read(f"libreswan_5.2_status_{side}.txt")
    files = {parts[0] for name in parse.loaded_conns(status) if (parts := render.split_name(name))}
    result = {"loaded": sorted(parse.loaded_conns(status)),
              "states": [asdict(s) for s in parse.states(status)],
              "observed": observed_json(status, files, files)}
    assert_golden(f"libreswan_5.2_status_{side}.parsed.json", as_json(result))


def test_captured_5_2_status_and_showstates_agree_on_states():
    for side in ("initiator", "responder"):
        assert parse.states(read(f"libreswan_5.2_status_{side}.txt")) == \
            parse.states(read(f"libreswan_5.2_showstates_{side}.txt"))


@pytest.mark.parametrize("name", ["libreswan_5.2_showstates_initiator.txt", "libreswan_5.2_showstates_responder.txt",
                                  "libreswan_4.10_esp_showstates_initiator.txt",
                                  "libreswan_4.10_esp_showstates_responder.txt"])
def test_captured_established_tunnel_with_esp(name):
    """Real Child SAs (the lab's kernel has ESP): one IKE SA, owned by the anchor, with the
    tunnel's two children installed on it, on both major versions."""
    found = parse.states(read(name))
    assert [s.serial for s in found if not s.child] == [1]
    assert all(s.established for s in found)
    ((peering, (sa,)),) = parse.ike_sas(found).items()
    assert sa.unique_id == "#1" and sa.state == "ESTABLISHED"
    assert [child.rsplit("_", 1)[1][:7] for child in sa.installed_children] == ["tun-in-", "tun-out"]
    assert all(child.startswith(peering + "_") for child in sa.installed_children)
    if "4.10" in name:
        result = {"states": [asdict(s) for s in found], "observed": observed_json(read(name))}
        assert_golden(name.replace(".txt", ".parsed.json"), as_json(result))


def test_trafficstatus_is_not_state_output():
    """The backend never reads --trafficstatus (captured for reference): its lines name the
    connection like state lines, with `type=ESP` where a state name would be."""
    for version in ("5.2", "4.10_esp"):
        text = read(f"libreswan_{version}_trafficstatus_initiator.txt")
        assert "type=ESP" in text and "inBytes=" in text and "ESTABLISHED" not in text


def test_captured_4_10_status_and_showstates_agree_on_states():
    for side in ("initiator", "responder"):
        assert parse.states(read(f"libreswan_4.10_status_{side}.txt")) == \
            parse.states(read(f"libreswan_4.10_showstates_{side}.txt"))


def test_captured_4_10_initiator_has_anchored_ike_sas_and_a_stuck_foreign_one():
    states = parse.states(read("libreswan_4.10_showstates_initiator.txt"))
    assert [(s.conn.rsplit("_", 1)[-1], s.child, s.established) for s in states] == [
        ("ike", False, True), ("ike", False, True), ("quiet-1", False, False)]
    sas = parse.ike_sas(states)
    assert set(sas) == {"ovsipsec-10.231.0.2-2e6364b79c", "ovsipsec-fd00:231::2-1c1b88c723"}
    assert all(sa.established and sa.installed_children == () for v in sas.values() for sa in v)


@pytest.mark.parametrize("name", ["libreswan_4.x_showstates_children.txt", "libreswan_5.x_status.txt",
                                  "libreswan_5.x_showstates_late.txt"])
def test_documented_formats(name):
    text = read(name)
    result = {"states": [asdict(s) for s in parse.states(text)], "observed": observed_json(text)}
    assert_golden(name.replace(".txt", ".parsed.json"), as_json(result))


def test_children_are_counted_on_their_ike_sa_and_the_anchor_is_not_a_child():
    for name, serial in (("libreswan_4.x_showstates_children.txt", "#1"), ("libreswan_5.x_status.txt", "#1"),
                         ("libreswan_5.x_showstates_late.txt", "#3")):
        (sa,) = parse.ike_sas(parse.states(read(name)))["ovsipsec-10.0.0.2-0123456789"]
        assert sa.unique_id == serial and sa.state == "ESTABLISHED"
        assert all("_ike" not in child for child in sa.installed_children)
        assert "ovsipsec-10.0.0.2-0123456789_gnv-out-abcdef" in sa.installed_children


def test_4x_negotiating_and_deleting_ike_sas():
    sas = parse.ike_sas(parse.states(read("libreswan_4.x_showstates_children.txt")))
    assert [sa.state for sa in sas["ovsipsec-10.0.0.3-abcdef0123"]] == ["CONNECTING"]
    assert [sa.state for sa in sas["ovsipsec-10.0.0.4-bbbbbbbbbb"]] == ["DELETING"]
    assert "myvpn-2" not in sas  # foreign: never ours


def test_5x_connection_list_keeps_foreign_names_apart():
    loaded = parse.loaded_conns(read("libreswan_5.x_status.txt"))
    assert "myvpn-2" in loaded and "ovsipsec-fd00::2-1c1b88c723_six-out-d937b7" in loaded
    observed = parse.observed(read("libreswan_5.x_status.txt"), {"ovsipsec-10.0.0.2-0123456789"}, set())
    assert set(observed.conns) == {"ovsipsec-10.0.0.2-0123456789", "ovsipsec-fd00::2-1c1b88c723"}
    assert parse.INCOMPLETE not in observed.conns["ovsipsec-10.0.0.2-0123456789"]
    # loaded but neither anchored nor on file: reported incomplete, so it is reloaded or removed
    assert parse.INCOMPLETE in observed.conns["ovsipsec-fd00::2-1c1b88c723"]


def test_a_file_without_pluto_connections_is_an_incomplete_peering():
    observed = parse.observed("", {"ovsipsec-10.0.0.9-aaaaaaaaaa"}, {"ovsipsec-10.0.0.9-aaaaaaaaaa"})
    assert observed.conns == {"ovsipsec-10.0.0.9-aaaaaaaaaa": frozenset({parse.INCOMPLETE})}
    assert observed.shared_secrets == {"ovsipsec-10.0.0.9-aaaaaaaaaa"}


def test_problem_on_captured_failures():
    # addconn exits 0 although the connection did not load
    rc, out, err = captured("libreswan_4.10_addconn_bad.txt")
    assert rc == 0 and "did not load properly" in parse.problem(out, err, rc)
    # whack exits 0 although it does not know the connection; the 021 code says so
    rc, out, err = captured("libreswan_4.10_initiate_unknown.txt")
    assert rc == 0 and parse.problem(out, err, rc) == 'no connection named "nosuch"'
    rc, out, err = captured("libreswan_4.10_not_running.txt")
    assert parse.unreachable(out, err) and parse.problem(out, err, rc)


def test_problem_on_captured_5_2_failures():
    # 5.2 exits non-zero where 4.10 exited 0, and words the errors differently, without codes
    rc, out, err = captured("libreswan_5.2_addconn_bad.txt")
    assert rc == 255 and parse.problem(out, err, rc).startswith("ERROR: ipsec addconn: bad leftprotoport=")
    rc, out, err = captured("libreswan_5.2_initiate_unknown.txt")
    assert rc == 21 and parse.problem(out, err, rc).startswith('no connection or alias named "nosuch"')
    rc, out, err = captured("libreswan_5.2_not_running.txt")
    assert rc == 33 and parse.unreachable(out, err) and "Pluto is not running" in parse.problem(out, err, rc)


@pytest.mark.parametrize("out", [
    "000 initiating all conns with alias='x'\n181 \"x\" #1: initiating IKEv2 connection\n",
    # seen in the lab: an initiate queued on an IKE SA that was retransmitting (code 010)
    '010 "ovsipsec-10.0.0.2-e2f25d7805_ike" #1: STATE_V2_ESTABLISHED_IKE_SA: retransmission; '
    'will wait 0.5 seconds for response\n',
    "002 loading secrets from \"/etc/ipsec.secrets\"\n",
    '"x" #1: initiating IKEv2 connection\n',  # 5.x: no codes
    "",
])
def test_no_problem_in_normal_output(out):
    assert parse.problem(out, "", 0) is None


def test_5x_failure_without_codes():
    assert parse.problem("", 'ipsec whack: no connection named "x"\n', 1)
    assert parse.problem("", "", 3) == "exit status 3"


def test_fingerprint_changes_when_an_sa_comes_up():
    before = parse.fingerprint(parse.states('#1: "ovsipsec-10.0.0.2-0123456789_ike":500 IKE_SA_INIT_I (sent); idle;'))
    after = parse.fingerprint(parse.states(read("libreswan_5.x_showstates_late.txt")))
    assert before.keys() == after.keys() == {"ovsipsec-10.0.0.2-0123456789"}
    assert before != after


def test_nss_listing_and_pem_blocks():
    listing = ("\nCertificate Nickname                                         Trust Attributes\n"
               "                                                             SSL,S/MIME,JAR/XPI\n\n"
               "ovsipsec-key-0123456789abcdef                                u,u,u\n"
               "ovsipsec-ca-0123456789abcdef                                 CT,,\n"
               "operator cert with spaces                                    CT,,\n")
    assert parse.nss_nicknames(listing) == {"ovsipsec-key-0123456789abcdef", "ovsipsec-ca-0123456789abcdef"}
    pem = "-----BEGIN CERTIFICATE-----\nAAAA\nBBBB\n-----END CERTIFICATE-----\n"
    assert parse.pem_blocks(pem + pem.replace("AAAA", "CCCC")) == ["AAAABBBB", "CCCCBBBB"]


@pytest.mark.parametrize("version", ["4.10", "5.2"])
def test_rendered_golden_files_were_accepted_by_real_pluto(version):
    """lab/run.sh --golden loads every rendered golden .conf (but those naming NSS certificates)
    into Debian 12's pluto 4.10 and Debian 13's 5.2 with `ipsec addconn`, as the backend does:
    each exited 0, with nothing on stderr and nothing parse.problem calls a problem."""
    outcome = json.loads(read(f"libreswan_{version}_golden_conf_addconn.json"))
    written = {path.stem for path in GOLDEN_DIR.glob("libreswan*.conf")}
    assert {case for case in written if not case.endswith(("ca_cert", "peer_cert"))} == outcome.keys()
    other_major = "libreswan5_" if version.startswith("4") else "libreswan4_"
    for case, result in outcome.items():
        if case.startswith(other_major):
            continue  # written for the other major version
        assert result["rc"] == 0 and not result["stderr"], case
        assert parse.problem(result["stdout"], result["stderr"], result["rc"]) is None, case
