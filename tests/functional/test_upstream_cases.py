"""Upstream's own test cases (OVS tests/system-ipsec.at; recipes in research-13/system-ipsec-cases.md)
that the contract does not cover, run end to end against both IKE daemons (`swan` is parametrized):
real ovsdb-servers, charons and plutos in network namespaces.

On this host's kernel no child SA can be installed (no ESP): a tunnel gets as far as its IKE SA
(`negotiating`), and that is what these cases compare (SA ids and serials, connections, files,
NSS). The lab scenarios of the same names prove ESP on the wire where that is the point.

Cases marked upstream_full run with `make functional-upstream`, not in `make check`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter

import pytest

from testsupport.daemons import LibreSwan, StrongSwan
from testsupport.procs import wait_for
from testsupport.tunnels import (
    add_tunnel,
    charon_conns,
    make_ca_signed,
    pki,
    send_tunnel_packet,
    use_certificate,
)

A, B, C = ("10.231.0.1/24", "fd00:231::1/64"), ("10.231.0.2/24", "fd00:231::2/64"), ("10.231.0.3/24", "fd00:231::3/64")


def start(sandbox, swan, name, addresses, *monitor_flags):
    host = sandbox.add_host(name, *addresses, ike_daemon=swan.name)
    host.start_ovsdb()
    host.start_ike_daemon()
    host.start_monitor(*monitor_flags)
    return host


def address(host, family):
    return host.addresses[0 if family == 4 else 1]


def sa_states(swan, host) -> set[str]:
    """Every SA the daemon holds, by the id that changes when it is replaced: charon's IKE SA unique
    ids; pluto's state serials (upstream's IPSEC_SA_LIST: `grep -oE '#[0-9]+:'`)."""
    if swan.name == "libreswan":
        return set(re.findall(r"^(?:000 )?(#\d+):", host.whack("--showstates"), re.M))
    return set(swan.ike_sa_ids(host).values())


def pass_summaries(host, since: int = 0) -> list[str]:
    """The monitor's one line per pass that changed something in the daemon ("applied ...")."""
    return [line for line in host.log_text()[since:].splitlines() if "| INFO | applied " in line]


def applied(host, since: int = 0) -> Counter[str]:
    """How many actions of each kind (LoadConn, UnloadConn, Initiate...) the monitor applied."""
    counts: Counter[str] = Counter()
    for line in pass_summaries(host, since):
        for number, kind in re.findall(r"(\d+) (\w+)", line.split(" applied ", 1)[1].split(" for ")[0]):
            counts[kind] += int(number)
    return counts


# -- 1. tunnels without local_ip (%defaultroute / %any) -------------------------------------------

@pytest.mark.parametrize("tunnel_type, family, auth", [
    pytest.param("geneve", 4, "psk", id="geneve-ipv4-psk"),
    pytest.param("geneve", 4, "ca", id="geneve-ipv4-ca", marks=pytest.mark.upstream_full),
    pytest.param("vxlan", 6, "psk", id="vxlan-ipv6-psk"),
])
def test_tunnels_without_local_ip_use_the_default_route(sandbox, swan, tmp_path, tunnel_type, family, auth):
    """upstream: "ipv4, geneve, defaultroute, psk|ca-signed" and "ipv6, vxlan, defaultroute, psk".
    Each node has a default route via its peer, as upstream's harness adds; the tunnels name only
    remote_ip. Without local_ip a PSK tunnel has no initiator rule both ends can agree on, so it
    comes up on the first packet (trap), as upstream's do; certificates give one (the lower name)."""
    a, b = start(sandbox, swan, "a", A), start(sandbox, swan, "b", B)
    a.add_default_route(address(b, family))
    b.add_default_route(address(a, family))
    if auth == "ca":
        make_ca_signed(tmp_path)
        use_certificate(a, tmp_path, "hostA", ca=True)
        use_certificate(b, tmp_path, "hostB", ca=True)
    for host, peer, peer_name in ((a, b, "hostB"), (b, a, "hostA")):
        credentials = {"remote_name": peer_name} if auth == "ca" else {"psk": "swordfish"}
        add_tunnel(host, peer, "tun", tunnel_type, family=family, local_ip=None, **credentials)
    for host in (a, b):
        # With certificates a initiates at once: b may be negotiating by the time it is looked at.
        loaded = host.wait_state("tun", ("loaded", "negotiating", "established"))
        assert loaded["local_ip"] is None and loaded["remote_ip"] == address(b if host is a else a, family)
    if auth == "psk":
        assert not a.tunnel("tun")["initiator"] and not b.tunnel("tun")["initiator"]
        send_tunnel_packet(a, address(b, family), tunnel_type)  # the datapath's first packet
    else:
        assert a.tunnel("tun")["initiator"] and not b.tunnel("tun")["initiator"]  # "hostA" < "hostB"
    for host in (a, b):
        assert host.wait_ike_up("tun", timeout=30)["auth"] == ("psk" if auth == "psk" else "ca-cert")
    if swan.name == "libreswan":
        conf = (a.lsw_root / "etc/ipsec.d" / f"{a.tunnel('tun')['conn']}.conf").read_text()
        assert "left=%defaultroute" in conf and f"right={address(b, family)}" in conf
        assert ("hostaddrfamily=ipv6" in conf) is (family == 6)  # LibreSwan 4: %defaultroute is IPv4
    else:  # charon picked the source address of the default route
        (sa,) = [sa for event in a.vici().list_sas() for sa in event.values()]
        assert sa["local-host"].decode() == address(a, family)


# -- 2. IPv6 VXLAN with local_ip (without: above) ---------------------------------------------------

def test_ipv6_vxlan_with_local_ip(sandbox, swan):
    """upstream: "ipv6, vxlan, localip, psk"."""
    a, b = start(sandbox, swan, "a", A), start(sandbox, swan, "b", B)
    for host, peer in ((a, b), (b, a)):
        add_tunnel(host, peer, "tun", "vxlan", family=6, psk="swordfish")
    tunnel = a.wait_ike_up("tun")
    assert (tunnel["local_ip"], tunnel["remote_ip"], tunnel["dst_port"]) == ("fd00:231::1", "fd00:231::2", 4789)
    assert tunnel["initiator"]
    assert not b.wait_ike_up("tun")["initiator"]


# -- 3. --root-ipsec-conf + --use-default-crypto (LibreSwan) -------------------------------------------

ROOT_CONF = "## A read-only root config. ##\nconfig setup\n    logtime=yes\n\ninclude {custom}\n"


def test_root_ipsec_conf_and_default_crypto(sandbox, swan):
    """upstream: "ipv4, geneve, custom conf, default crypto". pluto reads a read-only root ipsec.conf
    that includes the monitor's --ipsec-conf; with --use-default-crypto no ike=/esp= line is
    written (pluto's defaults on both ends), no `conn %default` either, and the root file is not
    touched. The lab's geneve-psk-custom-conf-libreswan scenario shows ESP on the wire."""
    if swan.name != "libreswan":
        pytest.skip("--root-ipsec-conf and --use-default-crypto are LibreSwan options")
    hosts = []
    for name, addresses in (("a", A), ("b", B)):
        host = sandbox.add_host(name, *addresses, ike_daemon="libreswan")
        root_conf = host.lsw_root / "etc/ipsec.conf"
        root_conf.parent.mkdir(parents=True)
        root_conf.write_text(ROOT_CONF.format(custom=host.lsw_root / "etc/custom.conf"))
        root_conf.chmod(0o444)
        host.start_ovsdb()
        host.start_pluto()
        host.start_monitor("--ipsec-conf=/etc/custom.conf", f"--root-ipsec-conf={root_conf}", "--use-default-crypto")
        hosts.append(host)
    a, b = hosts
    for host, peer in ((a, b), (b, a)):
        add_tunnel(host, peer, "tun", "geneve", psk="swordfish")
    for host in (a, b):
        conn = host.wait_ike_up("tun")["conn"]
        root = host.lsw_root / "etc"
        assert (root / "ipsec.conf").read_text() == ROOT_CONF.format(custom=root / "custom.conf")
        written = (root / "custom.conf").read_text() + (root / "ipsec.d" / f"{conn}.conf").read_text()
        assert f"include {root}/ipsec.d/ovsipsec-*.conf" in (root / "custom.conf").read_text()
        assert "conn %default" not in written
        assert not re.search(r"^\s*(ike|ikev2|esp)=", written, re.M), written
    # Both ends on pluto's own default proposals: what they agreed on is pluto's first default.
    assert re.search(r"#\d+: .*IKE SA.*established|established IKE SA", a.whack("--showstates"))


# -- 4. a peer that appears late ------------------------------------------------------------------

# Upstream runs it on LibreSwan; make check too (strongSwan with make functional-upstream).
@pytest.mark.parametrize("swan", [pytest.param(StrongSwan(), marks=pytest.mark.upstream_full), LibreSwan()],
                         ids=lambda swan: swan.name, indirect=True)
@pytest.mark.parametrize("family", [4, pytest.param(6, marks=pytest.mark.upstream_full)], ids=["ipv4", "ipv6"])
@pytest.mark.upstream_full  # 17 s or more per case: make functional-upstream
def test_a_peer_that_appears_late_comes_up_and_nothing_flaps_meanwhile(sandbox, swan, family):
    """upstream: "ipv4|ipv6, reconciliation interval". a is configured while its peer does not exist;
    five other tunnels to absent hosts come and go. For 12 s, which with --resync-interval=5 holds
    two full comparisons with the daemon (upstream waits out its 15 s reconciliation interval),
    a's connection is loaded once and never replaced or removed; then the peer host appears, is
    configured, and the tunnel comes up without anyone touching a."""
    a = start(sandbox, swan, "a", A, "--resync-interval=5")
    # As upstream's harness: a default route through a gateway that does not exist (10.1.1.254),
    # which is what the extra tunnels (no local_ip) resolve their own address through.
    a.add_default_route("10.231.0.254" if family == 4 else "fd00:231::254")
    add_tunnel(a, _Absent(B), "tun", "geneve", family=family, psk="swordfish")
    conn = a.wait_state("tun", "loaded")["conn"]
    started = time.monotonic()
    for index in range(1, 6):
        a.vsctl("add-port", "br-ipsec", f"tun-{index}", "--", "set", "interface", f"tun-{index}", "type=geneve",
                f"options:remote_ip={_absent_peer(family, index)}", "options:psk=swordfish")
        a.wait_state(f"tun-{index}", "loaded")
    for index in range(1, 6):
        a.vsctl("del-port", f"tun-{index}")
        wait_for(lambda index=index: a.tunnel(f"tun-{index}") is None, 10, what=f"tun-{index} removed")
    time.sleep(max(0.0, 12 - (time.monotonic() - started)))
    assert a.status()["reconcile"]["last_full_resync"] >= time.time() - 6  # a full comparison in the wait
    counts = applied(a)
    assert (counts["LoadConn"], counts["UnloadConn"]) == (6, 5), counts  # tun once; tun-1..5 in and out
    assert a.tunnel("tun")["conn"] == conn and conn in swan.conns(a)
    assert "event=tunnel_removed tunnel=tun " not in a.log_text()
    b = start(sandbox, swan, "b", B)
    appeared = time.monotonic()
    add_tunnel(b, a, "tun", "geneve", family=family, psk="swordfish")
    for host in (a, b):
        host.wait_ike_up("tun", timeout=60)
    assert a.tunnel("tun")["conn"] == conn
    print(f"{swan.name} IPv{family}: late peer up {time.monotonic() - appeared:.1f} s after it was configured")


class _Absent:
    """A peer that is not there yet: only its addresses."""

    def __init__(self, addresses):
        self.addresses = tuple(a.split("/")[0] for a in addresses)


def _absent_peer(family: int, index: int) -> str:
    return f"10.231.0.{100 + index}" if family == 4 else f"fd00:231::{100 + index:x}"


# -- 5. a third host joins without disturbing the existing SAs -------------------------------------------

@pytest.mark.parametrize("family", [4, pytest.param(6, marks=pytest.mark.upstream_full)], ids=["ipv4", "ipv6"])
def test_a_third_host_joins_without_disturbing_existing_sas(sandbox, swan, family):
    """upstream: "ipv4|ipv6, established conns survive a third host joining". left and right have a
    tunnel up; a third host joins with a tunnel to left. right's SAs are exactly what they were,
    left's old ones are all still there (upstream compares pluto's state serials: `diff`)."""
    left, right = start(sandbox, swan, "l", A), start(sandbox, swan, "r", B)
    for host, peer in ((left, right), (right, left)):
        add_tunnel(host, peer, "tun", "geneve", family=family, psk="swordfish")
    for host in (left, right):
        host.wait_ike_up("tun")
    time.sleep(1)  # let any crossing or retried negotiation settle before the "before" picture
    left_before, right_before = sa_states(swan, left), sa_states(swan, right)
    third = start(sandbox, swan, "t", C)
    add_tunnel(third, left, "tun", "geneve", family=family, psk="swordfish")
    add_tunnel(left, third, "tun3", "geneve", family=family, psk="swordfish")
    left.wait_ike_up("tun3")
    third.wait_ike_up("tun")
    left.appctl("refresh")
    left_after, right_after = sa_states(swan, left), sa_states(swan, right)
    assert right_after == right_before
    assert left_before < left_after
    print(f"{swan.name} IPv{family}: left {sorted(left_before)} -> {sorted(left_after)}, "
          f"right {sorted(right_before)} unchanged")


# -- 6. CA and certificates regenerated while the monitor is down -------------------------------------

def make_ca(folder):
    """`ovs-pki --force init` and `req+sign` for left and right, as upstream's recipe."""
    shutil.rmtree(folder / "pki", ignore_errors=True)
    for pem in folder.glob("*.pem"):
        pem.unlink()
    pki(folder, "init")
    for name in ("left", "right"):
        pki(folder, "req", name)
        pki(folder, "sign", name, "switch")


@pytest.mark.upstream_full  # an expected failure on both daemons (below), 20-65 s
def test_certificates_regenerated_while_the_monitor_is_down(sandbox, swan, tmp_path):
    """upstream: "certificate update while the daemon is down". left's monitor is killed (SIGTERM:
    no cleanup), a new CA and new certificates for both hosts are written over the same paths, and
    left's monitor starts again with --no-restart-ike-daemon. Upstream asserts that the SA serials
    on both sides are unchanged (the new certificates only matter at the next authentication) and
    that NSS holds exactly the new certificate and CA, nothing stale.

    Ours: exactly the new credentials are in NSS (LibreSwan) or loaded in charon (strongSwan), the
    old ones gone. The SAs are not kept: the certificates are part of the peering's name
    (backends' conn_name), so the restarted monitor replaces the peering, which ends its SA, and
    re-authenticates at once; that fails until right's monitor, still running, sees its own
    rotated files (its next full comparison: --resync-interval, 15 s here as upstream's
    reconciliation interval). With strongSwan the tunnel is then up again; with LibreSwan 4.10,
    pluto keeps rejecting the new CA (NSS: SEC_ERROR_UNTRUSTED_ISSUER, although NSS holds it with
    trust CT,,) until pluto restarts. Both differences end the test as expected failures, with
    the figures; everything before them must hold."""
    make_ca(tmp_path)
    left, right = (start(sandbox, swan, name, addresses, "--resync-interval=15")
                   for name, addresses in (("l", A), ("r", B)))
    use_certificate(left, tmp_path, "left", ca=True)
    use_certificate(right, tmp_path, "right", ca=True)
    add_tunnel(left, right, "tun", "geneve", remote_name="right")
    add_tunnel(right, left, "tun", "geneve", remote_name="left")
    for host in (left, right):
        host.wait_ike_up("tun")
    time.sleep(1)
    left_before, right_before = sa_states(swan, left), sa_states(swan, right)
    conn_before = left.tunnel("tun")["conn"]
    old = {_der((tmp_path / "left-cert.pem").read_text()): "left's old certificate",
           _der((tmp_path / "pki/switchca/cacert.pem").read_text()): "the old CA"}
    left.terminate_monitor()
    make_ca(tmp_path)
    new = {_der((tmp_path / "left-cert.pem").read_text()), _der((tmp_path / "pki/switchca/cacert.pem").read_text())}
    restarted = time.monotonic()
    left.start_monitor("--no-restart-ike-daemon", "--resync-interval=15")
    if swan.name == "libreswan":  # exactly our two entries, both the new files (upstream: 2 ovs_cert*)
        wait_for(lambda: sorted(_nss_certificates(left).values()) == sorted(new), 30, what="only the new certificates in NSS")
    else:
        # The new ones are loaded and the peering trusts only the new CA. (charon keeps every
        # certificate a connection ever brought in vici's credential set until it restarts: the
        # old two stay there, inert; only clear-creds would drop them, with everyone else's.)
        wait_for(lambda: new <= _charon_certificates(left), 30, what="the new certificates loaded in charon")
        conn = wait_for(lambda: (t := left.tunnel("tun")) and t["conn"] != conn_before and t["conn"], 30,
                        what="the peering with the new certificates")
        (listed,) = [c for event in left.vici().list_conns({"ike": conn}) for c in event.values()]
        (trusted,) = [dn.decode() for dn in listed["remote-1"]["cacerts"]]
        assert trusted.endswith(f"CN={_common_name(tmp_path / 'pki/switchca/cacert.pem')}")  # charon prints O=.., CN=..
    try:
        tunnel = wait_for(lambda: (t := left.tunnel("tun")) and t["ike_sas"] > 0 and t, 60,
                          what="the tunnel up again with the new certificates")
    except TimeoutError:
        rejected = [line for host in (left, right) for line in (host.workdir / "pluto.log").read_text().splitlines()
                    if "SEC_ERROR_UNTRUSTED_ISSUER" in line] if swan.name == "libreswan" else []
        if rejected:
            pytest.xfail(f"libreswan: not up again within 60 s: pluto rejects the new CA although NSS holds it "
                         f"with trust CT,, ({len(rejected)} times, e.g. {rejected[-1].split(': ', 1)[-1][:160]})")
        raise
    back_after = time.monotonic() - restarted
    right.wait_ike_up("tun", timeout=30)
    left_after, right_after = sa_states(swan, left), sa_states(swan, right)
    if (left_after, right_after) != (left_before, right_before):
        pytest.xfail(f"{swan.name}: the restarted monitor replaced the peering ({conn_before} -> {tunnel['conn']}), "
                     f"so the SAs changed (left {sorted(left_before)} -> {sorted(left_after)}, right "
                     f"{sorted(right_before)} -> {sorted(right_after)}); up again after {back_after:.1f} s. "
                     "Upstream keeps them until the next authentication.")


def _common_name(pem_path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.load_pem_x509_certificate(pem_path.read_bytes()).subject
    return name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _charon_certificates(host) -> set[bytes]:
    return {bytes(cert["data"]) for cert in host.vici().list_certs({"type": "X509"})}


def _der(pem: str) -> bytes:
    import base64

    body = pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
    return base64.b64decode("".join(body.split()))


def _nss_certificates(host) -> dict[str, bytes]:
    """{nickname: DER} of every certificate in the host's NSS database that is ours."""
    listing = subprocess.run(["certutil", "-L", "-d", f"sql:{host.lsw_root}/nss"], capture_output=True,
                             text=True, check=True).stdout
    names = re.findall(r"^(ovsipsec-\S+)", listing, re.M)
    found = {}
    for name in names:
        pem = subprocess.run(["certutil", "-L", "-d", f"sql:{host.lsw_root}/nss", "-a", "-n", name],
                             capture_output=True, text=True, check=True).stdout
        found[name] = _der(pem)
    return found


# -- 7. connections deleted behind the monitor's back are repaired -------------------------------------

def test_connections_deleted_behind_the_monitors_back_are_repaired(sandbox, swan):
    """upstream: "NxN geneve tunnels + reconciliation": pluto's own CLI deletes one tunnel's two
    connections and another tunnel's outbound one; the monitor notices by itself (no refresh) and
    loads them again. strongSwan: VICI unload-conn of the peering's connection. The monitor runs
    with --resync-interval=5 (upstream's reconciliation interval is 15 s) so the full comparison,
    the one that must find what no event reports, comes within the test's time."""
    a = start(sandbox, swan, "a", A, "--resync-interval=5")
    b = start(sandbox, swan, "b", B)
    for host, peer in ((a, b), (b, a)):
        for name, family in (("tun-2", 4), ("tun-5", 6)):
            add_tunnel(host, peer, name, "geneve", family=family, psk="swordfish")
    conns = {name: a.wait_ike_up(name)["conn"] for name in ("tun-2", "tun-5")}
    b.wait_ike_up("tun-2")
    deleted = time.monotonic()
    if swan.name == "libreswan":
        loaded = _pluto_conns(a)
        victims = [c for c in loaded if "_tun-2-" in c] + [c for c in loaded if "_tun-5-out-" in c]
        assert len(victims) == 3
        for victim in victims:
            a.whack("--delete", "--name", victim)
        assert not set(victims) & _pluto_conns(a)
        wait_for(lambda: set(victims) <= _pluto_conns(a), 45, what="the deleted connections loaded again")
    else:
        for conn in conns.values():
            a.vici().unload_conn({"name": conn})
        assert not set(conns.values()) & charon_conns(a)
        wait_for(lambda: set(conns.values()) <= charon_conns(a), 45, what="the unloaded connections loaded again")
    repaired = time.monotonic() - deleted
    for name in conns:
        assert a.wait_ike_up(name, timeout=30)["conn"] == conns[name]
    assert "refresh" not in a.log_text()
    print(f"{swan.name}: connections deleted behind the monitor's back loaded again after {repaired:.1f} s")


def _pluto_conns(host) -> set[str]:
    from ovs_ipsec.backends.libreswan import parse

    return parse.loaded_conns(host.whack("--status"))
