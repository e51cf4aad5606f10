"""Mixed clusters (issue 13, item 7): one host runs our monitor, its peer Debian's upstream
ovs-monitor-ipsec 3.1 (testsupport/upstream.py), as while hosts are upgraded one at a time.

Each IKE daemon, PSK and CA-signed certificates, and each side initiating: ours initiates when it
has the lower address (planner.is_initiator); upstream's strongSwan mode initiates on the first
packet (auto=route), its LibreSwan mode always (`ipsec auto --start` of every connection). On this
host's kernel no child SA can be installed (no ESP): the IKE SA is what both ends must agree on
here, and both must report it; the lab (scenarios `*-upstream-peer*`) proves ESP on the wire.

The certificates are RSA ones, as upstream's ovs-pki makes them (upstream writes `RSA` key lines
for strongSwan and `leftrsasigkey=%cert` for LibreSwan). Upstream's strongSwan mode needs the CA in
/etc/ipsec.d/cacerts, as the OVS IPsec tutorial tells operators: its own `ca` section lacks
`auto=add`, and charon ignores it (see testsupport/upstream.py, UpstreamStrongswan.trust_ca).
"""

from __future__ import annotations

import subprocess

import pytest

from testsupport.daemons import LibreSwan, StrongSwan, libreswan_missing
from testsupport.procs import wait_for
from testsupport.tunnels import add_tunnel, pki, send_tunnel_packet, use_certificate
from testsupport.upstream import UpstreamStrongswan, upstream_missing

# (IKE daemon, auth, tunnel type): each daemon with each auth, and every tunnel type once or more.
CASES = [
    ("strongswan", "psk", "geneve"),
    ("strongswan", "ca", "gre"),
    ("libreswan", "psk", "vxlan"),
    ("libreswan", "ca", "geneve"),
]
STATUS_AUTH = {"psk": "psk", "ca": "ca-cert"}
DAEMONS = {"strongswan": StrongSwan(), "libreswan": LibreSwan()}


# make check runs each (daemon, auth) once, the initiating side alternating; the other four with
# make functional-upstream (marker upstream_full).
DEFAULT_INITIATOR = {CASES[0]: "ours", CASES[1]: "upstream", CASES[2]: "upstream", CASES[3]: "ours"}
PARAMS = [pytest.param(*case, initiator, id=f"{'-'.join(case)}-{initiator}-initiates",
                       marks=() if DEFAULT_INITIATOR[case] == initiator else pytest.mark.upstream_full)
          for case in CASES for initiator in ("ours", "upstream")]


@pytest.mark.parametrize("daemon, auth, tunnel_type, initiator", PARAMS)
def test_ours_and_upstream_bring_up_one_ike_sa_and_both_report_it(sandbox, tmp_path, daemon, auth, tunnel_type,
                                                                   initiator):
    for reason in (upstream_missing(), daemon == "libreswan" and libreswan_missing()):
        if reason:
            pytest.skip(reason)
    swan = DAEMONS[daemon]
    a = sandbox.add_host("a", "10.231.0.1/24", ike_daemon=daemon)  # the lower address
    b = sandbox.add_host("b", "10.231.0.2/24", ike_daemon=daemon)
    ours, theirs = (a, b) if initiator == "ours" else (b, a)
    names = {a: "hostA", b: "hostB"}
    for host in (a, b):
        host.start_ovsdb()
    ours.start_ike_daemon()
    ours.start_monitor()
    cacert = None
    if auth == "ca":
        pki(tmp_path, "init", "-k", "rsa")
        for name in names.values():
            pki(tmp_path, "req", "-k", "rsa", name)
            pki(tmp_path, "sign", name, "switch")
        cacert = tmp_path / "pki/switchca/cacert.pem"
    upstream = theirs.start_upstream(trust_ca=cacert)
    for host, peer in ((a, b), (b, a)):
        if auth == "ca":
            use_certificate(host, tmp_path, names[host], ca=True)
            add_tunnel(host, peer, "tun", tunnel_type, remote_name=names[peer])
        else:
            add_tunnel(host, peer, "tun", tunnel_type, psk="swordfish")

    if initiator == "upstream" and isinstance(upstream, UpstreamStrongswan):
        # auto=route: upstream's charon initiates on the tunnel's first packet, once its trap is in.
        wait_for(lambda: f"dst {ours.address}/32" in _xfrm_policies(theirs), 30, what="upstream's trap policy")
        send_tunnel_packet(theirs, ours.address, tunnel_type)
    tunnel = ours.wait_ike_up("tun", timeout=45)
    assert tunnel["auth"] == STATUS_AUTH[auth]
    assert tunnel["initiator"] is (initiator == "ours")
    if auth == "ca":
        assert tunnel["remote_name"] == names[theirs]

    # Upstream reports the same IKE SA, and the side the case names is the one that initiated it.
    if isinstance(upstream, UpstreamStrongswan):
        ours_sa = _only_sa(ours.vici().list_sas({"ike": tunnel["conn"]}))
        theirs_sas = [sa for event in upstream.session().list_sas() for name, sa in event.items()
                      if name.startswith("tun-") and sa["state"] == b"ESTABLISHED"]
        assert [(sa["initiator-spi"], sa["responder-spi"]) for sa in theirs_sas] == \
            [(ours_sa["initiator-spi"], ours_sa["responder-spi"])]
        assert (ours_sa.get("initiator") == b"yes") is (initiator == "ours")
        # Ours offers curve25519 first and keeps MODP-2048, upstream's only group: whoever
        # initiates, the two agree on MODP-2048 (ours initiating costs one INVALID_KE_PAYLOAD).
        assert ours_sa["dh-group"] == theirs_sas[0]["dh-group"] == b"MODP_2048"
        assert (theirs_sas[0].get("initiator") == b"yes") is (initiator == "upstream")
        if tunnel_type == "gre":  # upstream's own report; for UDP tunnels its `ipsec status` regex
            # files the SA under "tun-in"/"tun-out" (ovs-issues#355), never under the tunnel
            assert any("ESTABLISHED" in line for line in upstream.active_conns("tun"))
    else:
        assert any("ESTABLISHED_IKE_SA" in line for line in upstream.active_conns("tun"))
        assert tunnel["conn"] in swan.ike_sa_ids(ours)
        pluto_log = (ours.workdir / "pluto.log").read_text()
        # Upstream's LibreSwan mode always initiates; ours only from the lower address. When both
        # do, the two IKE_SA_INITs cross and either exchange may be the one that completes first,
        # so what is ours is the attempt; as the responder only, it never tries.
        assert ("initiating IKEv2 connection" in pluto_log) is (initiator == "ours")
        assert "established IKE SA" in pluto_log
        if initiator == "upstream":
            assert "responder established IKE SA" in pluto_log
    print(f"{daemon} {auth} {tunnel_type}, {initiator} initiates: ours {tunnel['conn']} ike_sas={tunnel['ike_sas']}")


def _xfrm_policies(host) -> str:
    return subprocess.run(host.netns("ip", "xfrm", "policy"), capture_output=True, text=True, check=True).stdout


def _only_sa(events) -> dict:
    (sa,) = [sa for event in events for sa in event.values() if sa["state"] == b"ESTABLISHED"]
    return sa
