"""The LibreSwan adapter against a scripted `ipsec`: which commands, in which order, which files."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from testsupport.builders import desired, row
from testsupport.golden import GOLDEN_DIR
from ovs_ipsec.backends.libreswan import render
from ovs_ipsec.backends.libreswan.backend import LibreSwanBackend
from ovs_ipsec.backends.libreswan.files import Paths
from ovs_ipsec.errors import BackendError
from ovs_ipsec.planner import Initiate, LoadConn, LoadSecret, UnloadConn, UnloadSecret, group_peerings
from ovs_ipsec.runner import Completed
from ovs_ipsec.validate import CertificateFacts, validate

PSK = dict(local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish")


class FakeIpsec:
    """Answers like `ipsec` would; records every argv."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.status = ""
        self.version = "Libreswan 4.10\n"
        self.answers: dict[str, Completed] = {}
        self.intercept = lambda argv, timeout: None  # a test's own answer first (may raise)

    def __call__(self, argv, timeout=30.0, input_text=None, check=True, stdout_file=None):
        assert timeout > 0
        self.calls.append(argv)
        answer = self._answer(argv, timeout)
        if stdout_file is not None:  # as the runner does: the output goes to the file
            stdout_file.write(answer.stdout)
            stdout_file.flush()
            return Completed("", answer.stderr, answer.returncode)
        return answer

    def _answer(self, argv, timeout):
        answer = self.intercept(argv, timeout)
        if answer is not None:
            return answer
        if argv[1:] == ["--version"]:
            return Completed(self.version, "")
        verb = argv[4] if argv[1] == "whack" else argv[1]
        if verb in self.answers:
            return self.answers[verb]
        if verb in ("--status", "--showstates"):
            return Completed(self.status, "")
        return Completed("", "")

    def commands(self, rereads: bool = True) -> list[list[str]]:
        """The calls after --version, without the fixed `ipsec whack --ctlsocket X` prefix."""
        found = [c[4:] if c[1] == "whack" else [c[1], *c[6:]] for c in self.calls if c[1:] != ["--version"]]
        return [c for c in found if rereads or c != ["--rereadsecrets"]]


@pytest.fixture
def fake():
    return FakeIpsec()


@pytest.fixture
def paths(tmp_path):
    return Paths.from_flags(str(tmp_path))


@pytest.fixture
def lsw(fake, paths):
    return LibreSwanBackend(paths, run=fake)


def peering_of(lsw, *rows):
    tunnels = validate(desired(*rows), CertificateFacts(), 0).tunnels
    (peering,) = group_peerings(tunnels, lsw.naming)[0].values()
    return peering


def status_with(*names, states=()):
    conns = "".join(f'000 "{name}": 10.0.0.1...10.0.0.2; unrouted; eroute owner: #0\n' for name in names)
    return "000 Connection list:\n000  \n" + conns + "000  \n" + "".join(f"000 {s}\n" for s in states)


def test_version_is_detected_once_and_picks_the_dialect(fake, lsw):
    assert (lsw.dialect().major, lsw.dialect().minor) == (4, 10)
    assert sum(1 for c in fake.calls if c[1:] == ["--version"]) == 1


@pytest.mark.parametrize("version, major, minor", [("4.10", 4, 10), ("5.2", 5, 2)])
def test_captured_versions_pick_the_dialect_and_the_file_style(fake, paths, version, major, minor):
    """Debian 12's and Debian 13's `ipsec --version` (captured in the lab): the dialect, and the
    rendering style that follows it (5.x files: no hostaddrfamily=; the style is in every name)."""
    fake.version = (GOLDEN_DIR / f"libreswan_{version}_version.txt").read_text()
    lsw = LibreSwanBackend(paths, run=fake)
    assert (lsw.dialect().major, lsw.dialect().minor) == (major, minor)
    tunnel = validate(desired(row("gnv0", "geneve", **PSK)), CertificateFacts(), 0).tunnels[0]
    assert lsw.naming.conn_name(tunnel) == render.conn_name(tunnel, render.Style(major=major))
    assert lsw.dialect().whack(paths, "--status") == [paths.ipsec, "whack", "--ctlsocket", paths.ctl, "--status"]


def test_5_2_refusing_to_initiate_an_unknown_connection_is_an_error_with_its_reason(fake, lsw):
    """5.2 exits 21 and prints `no connection or alias named` (4.10: exit 0, `021 no connection named`)."""
    from testsupport.golden import captured

    fake.version = (GOLDEN_DIR / "libreswan_5.2_version.txt").read_text()
    rc, out, err = captured("libreswan_5.2_initiate_unknown.txt")
    fake.answers["--name"] = Completed(out, err, rc)
    with pytest.raises(BackendError) as error:
        lsw.apply(Initiate("ovsipsec-10.0.0.2-0123456789", "nosuch"))
    assert not error.value.transport and 'no connection or alias named "nosuch"' in str(error.value)


def test_an_ipsec_that_is_not_libreswan_is_an_error(fake, lsw):
    fake.version = "Linux strongSwan U5.9.8/K6.1.0\n"
    with pytest.raises(BackendError) as error:
        lsw.dialect()
    assert error.value.transport and "does not name a LibreSwan version" in str(error.value)


def test_load_conn_writes_one_file_and_adds_the_whole_peering_in_one_call_anchor_last(fake, lsw, paths):
    peering = peering_of(lsw, row("gnv0", "geneve", **PSK), row("gre0", "gre", **PSK))
    lsw.apply(LoadConn(peering))
    assert not [c for c in fake.commands() if c[0] == "addconn"]  # queued for the batch
    assert lsw.flush() == {}
    path = os.path.join(paths.conn_dir, f"{peering.conn_name}.conf")
    assert open(path).read() == render.conn_file(peering, render.Style(major=4))
    adds = [c for c in fake.commands() if c[0] == "addconn"]
    assert adds == [["addconn", *render.pluto_names(peering)]]
    (argv,) = [c for c in fake.calls if c[1] == "addconn"]
    assert argv[5] == path  # --config: alone in its batch, only this peering's file is parsed
    assert adds[0][-1] == render.anchor_name(peering.conn_name)


def test_load_conn_adds_only_what_is_missing_and_deletes_what_is_stale(fake, lsw):
    old = peering_of(lsw, row("gnv0", "geneve", **PSK), row("gre0", "gre", **PSK))
    new = peering_of(lsw, row("gre0", "gre", **PSK), row("vx0", "vxlan", **PSK))
    assert old.conn_name == new.conn_name
    anchor = render.anchor_name(old.conn_name)
    fake.status = status_with(*render.pluto_names(old), states=[f'#1: "{anchor}":500 STATE_V2_ESTABLISHED_IKE_SA '
                                                                "(established IKE SA); newest; idle;"])
    lsw.observe()
    fake.calls.clear()
    lsw.apply(LoadConn(new))
    lsw.flush()
    added = [child for child, owner in new.children if owner == "vx0"]
    gone = sorted(child for child, owner in old.children if owner == "gnv0")
    assert fake.commands(rereads=False) == [["addconn", *added]] + [["--name", name, "--delete"] for name in gone]


def test_the_anchor_is_re_added_behind_new_children_when_it_holds_no_ike_sa(fake, lsw):
    old = peering_of(lsw, row("gre0", "gre", **PSK))
    new = peering_of(lsw, row("gre0", "gre", **PSK), row("vx0", "vxlan", **PSK))
    anchor = render.anchor_name(old.conn_name)
    gre = old.children[0][0]
    fake.status = status_with(*render.pluto_names(old), states=[f'#1: "{gre}":500 STATE_V2_ESTABLISHED_IKE_SA '
                                                                "(established IKE SA); newest; idle;"])
    lsw.observe()
    fake.calls.clear()
    lsw.apply(LoadConn(new))
    lsw.flush()
    assert fake.commands(rereads=False) == [["addconn", *[c for c, owner in new.children if owner == "vx0"], anchor]]


def test_initiate_starts_the_ike_sa_with_the_anchor_then_queues_the_child(fake, lsw):
    peering = peering_of(lsw, row("gnv0", "geneve", **PSK))
    anchor = render.anchor_name(peering.conn_name)
    child = peering.children[0][0]
    fake.status = status_with(*render.pluto_names(peering))
    lsw.observe()
    fake.calls.clear()
    lsw.apply(Initiate(peering.conn_name, child))
    # pluto has not read our secrets since we started: IKE_AUTH will need the PSK.
    assert fake.commands() == [["--rereadsecrets"],
                               ["--name", anchor, "--initiate", "--asynchronous"],
                               ["--name", child, "--initiate", "--asynchronous"]]
    fake.status = status_with(*render.pluto_names(peering), states=[
        f'#1: "{anchor}":500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); newest; idle;'])
    lsw.observe()
    fake.calls.clear()
    lsw.apply(Initiate(peering.conn_name, peering.children[1][0]))
    assert fake.commands() == [["--name", peering.children[1][0], "--initiate", "--asynchronous"]]


def rereads(fake):
    return len([c for c in fake.commands() if c == ["--rereadsecrets"]])


def test_secrets_are_private_and_reread_once_per_batch_when_they_change(fake, lsw, paths):
    peering = peering_of(lsw, row("gnv0", "geneve", **PSK))
    lsw.apply(LoadSecret(peering))
    lsw.apply(LoadSecret(peering))
    path = os.path.join(paths.conn_dir, f"{peering.secret_id}.secrets")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "PSK 0sc3dvcmRmaXNo" in open(path).read()
    assert not [name for name in os.listdir(paths.conn_dir) if name.endswith(".tmp")]
    assert rereads(fake) == 0  # deferred to the end of the batch
    lsw.flush()
    assert rereads(fake) == 1
    lsw.apply(LoadSecret(peering))  # unchanged
    lsw.flush()
    assert rereads(fake) == 1
    lsw.apply(UnloadSecret(peering.secret_id))
    lsw.flush()
    assert not os.path.exists(path) and rereads(fake) == 2


def test_a_batch_of_many_secrets_costs_pluto_one_reread(fake, lsw):
    # Each reread makes pluto parse every secrets file: one per tunnel would be O(N^2).
    for i in range(1, 51):
        lsw.apply(LoadSecret(peering_of(lsw, row(f"gnv{i}", "geneve", psk="swordfish", local_ip="10.0.0.1",
                                                 remote_ip=f"10.0.1.{i}"))))
    lsw.flush()
    assert rereads(fake) == 1


def test_unload_deletes_children_then_the_anchor_and_the_file(fake, lsw, paths):
    peering = peering_of(lsw, row("gnv0", "geneve", **PSK))
    lsw.observe()
    lsw.apply(LoadConn(peering))
    fake.calls.clear()
    lsw.apply(UnloadConn(peering.conn_name))
    deleted = [c[1] for c in fake.commands() if c[-1] == "--delete"]
    assert sorted(deleted[:-1]) == sorted(c for c, _ in peering.children)
    assert deleted[-1] == render.anchor_name(peering.conn_name)
    assert not os.path.exists(os.path.join(paths.conn_dir, f"{peering.conn_name}.conf"))


def test_main_files_are_written_when_missing_and_left_alone_when_foreign(fake, paths):
    LibreSwanBackend(paths, run=fake).observe()
    conf, secrets = open(paths.conf).read(), open(paths.secrets).read()
    assert conf.startswith(render.FILE_HEADER) and "config setup" in conf
    assert f"include {paths.conn_dir}/ovsipsec-*.conf" in conf
    assert f"include {paths.conn_dir}/ovsipsec-*.secrets" in secrets
    assert stat.S_IMODE(os.stat(paths.secrets).st_mode) == 0o600
    with open(paths.conf, "w") as handle:
        handle.write("config setup\n    uniqueids=yes\n")  # the operator's own
    LibreSwanBackend(paths, run=fake).observe()
    assert open(paths.conf).read() == "config setup\n    uniqueids=yes\n"


def test_sub_config_mode_writes_only_the_include(fake, tmp_path):
    paths = Paths.from_flags(str(tmp_path), ipsec_conf="/etc/ipsec.d/ovs.conf", root_ipsec_conf="/etc/ipsec.conf")
    LibreSwanBackend(paths, run=fake).observe()
    text = open(paths.conf).read()
    assert "config setup" not in text and "include " in text


def test_refusals_and_unreachable_pluto(fake, lsw):
    peering = peering_of(lsw, row("gnv0", "geneve", **PSK))
    rc, rest = (GOLDEN_DIR / "libreswan_4.10_addconn_bad.txt").read_text().split("\n", 1)
    out, err = rest.removeprefix("--- stdout\n").split("--- stderr\n")
    fake.answers["addconn"] = Completed(out, err, 0)
    lsw.apply(LoadConn(peering))
    (error,) = lsw.flush().values()
    assert not error.transport and "did not load properly" in str(error)
    fake.answers["--status"] = Completed("", 'whack: Pluto is not running (no "/run/pluto/pluto.ctl")\n', 33)
    with pytest.raises(BackendError) as error:
        lsw.observe()
    assert error.value.transport


def test_observe_limits_to_the_scope_and_sees_files_without_connections(fake, lsw, paths):
    one = peering_of(lsw, row("gnv0", "geneve", **PSK))
    two = peering_of(lsw, row("gnv1", "geneve", local_ip="10.0.0.1", remote_ip="10.0.0.3", psk="x"))
    lsw.apply(LoadConn(one))
    lsw.apply(LoadConn(two))
    fake.status = status_with(*render.pluto_names(one), "myvpn-2")
    full = lsw.observe()
    assert full.conns[one.conn_name] == frozenset(c for c, _ in one.children)
    assert two.conn_name in full.conns  # on file, not in pluto: reloaded (or removed) by the planner
    fake.calls.clear()
    assert set(lsw.observe([two.conn_name]).conns) == {two.conn_name}
    assert [c[4] for c in fake.calls] == ["--showstates"]  # scoped: only the states are listed again


def test_a_pluto_restart_is_reported_as_a_full_resync(fake, tmp_path):
    """No timer: the watch on pluto's run directory wakes up when a new socket appears."""
    paths = Paths.from_flags(str(tmp_path))
    os.makedirs(os.path.dirname(paths.ctl))
    open(paths.ctl, "w").close()
    lsw = LibreSwanBackend(paths, run=fake)
    calls, restarted = [], threading.Event()

    def on_change(names):
        calls.append(names)
        if calls.count(None) == 2:
            restarted.set()

    lsw._secrets_fresh = True
    lsw.start_events(on_change)
    try:
        for _ in range(100):
            if calls:
                break
            threading.Event().wait(0.02)
        assert calls == [None]  # pluto is there: look at everything once
        os.unlink(paths.ctl)
        threading.Event().wait(0.3)
        open(paths.ctl, "w").close()  # a new socket: a new pluto
        assert restarted.wait(5)
        assert not lsw._secrets_fresh  # its secrets are read again before the next use
        assert [t.name for t in threading.enumerate() if t.name == "pluto-poll"] == []
    finally:
        lsw.close()


def test_a_run_directory_that_appears_later_is_watched_too(fake, tmp_path):
    paths = Paths.from_flags(str(tmp_path))
    lsw = LibreSwanBackend(paths, run=fake)
    calls, seen = [], threading.Event()

    def on_change(names):
        calls.append(names)
        seen.set()

    lsw.start_events(on_change)
    try:
        assert calls == []
        os.makedirs(os.path.dirname(paths.ctl))
        threading.Event().wait(0.3)
        open(paths.ctl, "w").close()
        assert seen.wait(5) and calls == [None]
    finally:
        lsw.close()


def test_a_run_directory_made_a_level_at_a_time_is_still_watched(fake, tmp_path):
    """The watch sits on tmp_path; `run` appears, the watch moves to it and lets the burst settle;
    `run/pluto` appears during that settling. That event must move the watch on, not be drained."""
    paths = Paths.from_flags(str(tmp_path))
    lsw = LibreSwanBackend(paths, run=fake)
    seen = threading.Event()
    lsw.start_events(lambda names: seen.set())
    try:
        os.mkdir(tmp_path / "run")
        threading.Event().wait(0.1)  # the watch has moved to run/ and is settling (0.2 s)
        os.mkdir(tmp_path / "run" / "pluto")
        threading.Event().wait(0.4)
        open(paths.ctl, "w").close()
        assert seen.wait(5)
    finally:
        lsw.close()


def test_a_private_key_reaches_nss_only_through_a_private_short_lived_file(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ovs_ipsec.backends.libreswan import nss

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = _self_signed(key)
    seen, present = [], []

    def fake_run(argv, timeout=30.0, input_text=None, check=True):
        if argv[0] == "pk12util":
            path = argv[argv.index("-i") + 1]
            folder = os.path.dirname(path)
            seen.append((path, stat.S_IMODE(os.stat(folder).st_mode), stat.S_IMODE(os.stat(path).st_mode),
                         open(path, "rb").read(), argv[argv.index("-W") + 1]))
            present.append(cert_pem.decode())
            return Completed("pk12util: PKCS12 IMPORT SUCCESSFUL\n", "")
        if argv[:2] == ["certutil", "-L"] and "-n" in argv:
            return Completed("".join(present), "", 0 if present else 255)
        return Completed("", "")

    nss.NssDatabase(str(tmp_path), 10, fake_run).ensure("ovsipsec-key-0123456789abcdef", cert_pem, "u,u,u", key_pem)
    ((path, folder_mode, file_mode, bundle, password),) = seen
    assert folder_mode == 0o700 and file_mode == 0o600
    assert "ovsipsec-key" not in path  # not a predictable name
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    assert password and b"PRIVATE KEY" not in bundle and key_pem not in bundle  # encrypted PKCS#12


def test_nss_cleanup_keeps_what_the_peerings_in_force_use_and_never_touches_foreign_entries(paths):
    from cryptography.hazmat.primitives.asymmetric import ec

    from ovs_ipsec.model import AuthMethod, Tunnel, TunnelType
    from ovs_ipsec.planner import Peering

    tunnel = Tunnel("t", TunnelType.GENEVE, "10.0.0.2", "10.0.0.1", 4, AuthMethod.CA_CERT, 6081,
                    local_name="a", remote_name="b", local_cert_pem=_self_signed(ec.generate_private_key(ec.SECP256R1())),
                    ca_cert_pem=_self_signed(ec.generate_private_key(ec.SECP256R1())))
    local, _peer, ca = render.nss_names(tunnel)
    unused = "ovsipsec-peer-00000000000000bb"
    os.makedirs(paths.nss_dir)
    deleted = []

    def fake_run(argv, timeout=30.0, input_text=None, check=True):
        if argv[:2] == ["certutil", "-L"] and "-n" not in argv:
            return Completed(f"{local}  u,u,u\n{ca}  CT,,\n{unused}  P,P,P\noperator-ca  CT,,\n"
                             "ovsipsec-peer-0000000000000bb%0a  P,P,P\n", "")
        if argv[:2] == ["certutil", "-L"]:
            name = argv[argv.index("-n") + 1]
            return Completed("" if name in deleted else "-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n", "")
        if argv[1] in ("-D", "-F"):
            deleted.append(argv[argv.index("-n") + 1])
        return Completed("", "")

    backend = LibreSwanBackend(paths, run=fake_run)
    backend.cleanup_credentials([Peering("ovsipsec-10.0.0.2-0123456789", None, (tunnel,), (), True)])
    assert deleted == [unused]


def _self_signed(key) -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostA")])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_stuck_command_fails_only_its_own_connection(fake, lsw):
    from ovs_ipsec.errors import CommandError

    peering = peering_of(lsw, row("gnv0", "geneve", **PSK))

    def stuck(argv, timeout):
        if argv[1] == "addconn":
            raise CommandError(argv, f"timed out after {timeout:g} s")

    fake.intercept = stuck
    lsw.apply(LoadConn(peering))
    failed = lsw.flush()
    assert list(failed) == [peering.conn_name]  # backoff for this one only
    assert not failed[peering.conn_name].transport and "timed out" in str(failed[peering.conn_name])


def test_a_file_that_cannot_be_written_fails_its_connection_only(fake, lsw, paths):
    """Writing over a directory raised the PKI module's own error, which aborted the whole pass."""
    peering = peering_of(lsw, row("gnv0", "geneve", **PSK))
    os.makedirs(os.path.join(paths.conn_dir, f"{peering.secret_id}.secrets"))
    with pytest.raises(BackendError) as error:
        lsw.apply(LoadSecret(peering))
    assert not error.value.transport and "cannot write" in str(error.value)


def test_a_bulk_load_is_one_addconn_and_a_peering_pluto_did_not_take_fails_alone(fake, lsw, paths):
    """addconn's status is the last connection's: pluto's list says what a batch loaded."""
    peerings = [peering_of(lsw, row(f"gnv{i}", "geneve", psk="swordfish", local_ip="10.0.0.1",
                                    remote_ip=f"10.0.1.{i}")) for i in range(1, 6)]
    bad = peerings[2]
    lsw.observe()
    fake.status = status_with(*(n for p in peerings if p is not bad for n in render.pluto_names(p)))
    fake.calls.clear()
    batch_texts = []

    def addconn(argv, timeout):
        if argv[1] == "addconn" and ".ovsipsec-batch-" in argv[5]:
            batch_texts.append(open(argv[5]).read())
        if argv[1] == "addconn" and argv[5].endswith(f"{bad.conn_name}.conf"):
            return Completed("", "", 36)  # 4.10: an unknown proposal, and not a word
        return None

    fake.intercept = addconn
    for peering in peerings:
        lsw.apply(LoadConn(peering))
    assert not [c for c in fake.commands() if c[0] == "addconn"]
    failed = lsw.flush()
    assert list(failed) == [bad.conn_name] and "exit status 36" in str(failed[bad.conn_name])
    adds = [c for c in fake.calls if c[1] == "addconn"]
    assert len(adds) == 2 and adds[1][6:] == list(render.pluto_names(bad))
    assert all(f"conn {n}\n" in batch_texts[0] for p in peerings for n in render.pluto_names(p))
    assert not [n for n in os.listdir(paths.conn_dir) if n.startswith(".ovsipsec-batch-")]  # removed
    # Its initiation waits for the load, which failed: not sent, reported once by flush().
    lsw.apply(LoadConn(bad))
    lsw.apply(Initiate(bad.conn_name, bad.children[0][0]))
    assert not [c for c in fake.commands() if "--initiate" in c]
    assert list(lsw.flush()) == [bad.conn_name] and lsw.flush() == {}


def test_our_updown_command_runs_libreswans_first_and_then_hints_the_monitor(fake, paths):
    lsw = LibreSwanBackend(paths, unixctl="/run/openvswitch/ovs-monitor-ipsec.1.ctl", run=fake)
    peering = peering_of(lsw, row("gnv0", "geneve", **PSK))
    lsw.apply(LoadConn(peering))
    lsw.flush()
    script = os.path.join(paths.conn_dir, "ovsipsec-updown")
    text = open(script).read()
    assert stat.S_IMODE(os.stat(script).st_mode) == 0o755
    assert text.index(f"{paths.ipsec} _updown") < text.index("ipsec/lsw-event")
    assert '"$PLUTO_CONNECTION" "$PLUTO_VERB"' in text and "exit $status" in text
    conf = open(os.path.join(paths.conn_dir, f"{peering.conn_name}.conf")).read()
    assert conf.count(f"leftupdown={script}\n") == len(render.pluto_names(peering))
    with pytest.raises(BackendError):
        LibreSwanBackend(paths, unixctl="/run/x;reboot.ctl", run=fake)


@pytest.mark.parametrize("argv, peering", [
    (["ovsipsec-10.0.0.2-0123456789_ike", "up-host"], "ovsipsec-10.0.0.2-0123456789"),
    (["ovsipsec-10.0.0.2-0123456789_gnv0-in-abcdef"], "ovsipsec-10.0.0.2-0123456789"),
    (["ovsipsec-10.0.0.2-0123456789_ike", "up;host"], None),
    (["myvpn", "up-host"], None),
    (["ovsipsec-10.0.0.2-0123456789_ike\nforged"], None),
    (["ovsipsec-10.0.0.2-0123456789"], None),
])
def test_a_hint_names_one_of_our_connections_or_is_refused(argv, peering):
    from ovs_ipsec.backends.libreswan import events

    found, what = events.peering_of_hint(argv)
    assert found == peering
    assert "\n" not in what
