"""One table of configurations, rendered by every backend and compared byte for byte with golden files.

strongSwan's rendering is the VICI load-conn message (as JSON), LibreSwan's the per-peering file for
pluto 4 and pluto 5. A new tunnel option, type or auth mode is one more row here, and one more
golden file per backend (UPDATE_GOLDEN=1 writes them; review the diff).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from ovs_ipsec.backends.libreswan import render as libreswan
from ovs_ipsec.backends.strongswan import render as strongswan
from ovs_ipsec.backends.strongswan.backend import StrongSwanBackend
from ovs_ipsec.model import AuthMethod, Tunnel, TunnelType
from ovs_ipsec.planner import group_peerings
from ovs_ipsec.validate import CertificateFacts, validate
from testsupport.builders import desired, row
from testsupport.golden import GOLDEN_DIR, assert_golden

PSK = dict(local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish")
# Every option the monitor applies, in the spellings OVN and upstream's documentation use; the
# proposals are left out here (their names differ between the daemons: see each backend's tests).
EVERY_OPTION = {"ipsec_encapsulation": "yes", "ipsec_dpd-delay": "10s", "ipsec_dpd-timeout": "60s",
                "ipsec_ikelifetime": "8h", "ipsec_salifetime": "1h", "ipsec_rekeymargin": "5m",
                "ipsec_rekeyfuzz": "50%", "ipsec_replay-window": "128", "ipsec_pfs": "no", "ipsec_esn": "yes",
                "ipsec_mobike": "no", "ipsec_fragmentation": "yes", "ipsec_keyingtries": "%forever",
                "ipsec_nat-keepalive": "yes", "ipsec_retransmit-timeout": "90s"}


def pem(name: str) -> bytes:
    return (GOLDEN_DIR / f"libreswan_{name}.pem").read_bytes()


def certificate_tunnel(auth: AuthMethod) -> Tunnel:
    base = Tunnel(name="tun", type=TunnelType.GENEVE, remote_ip="10.0.0.2", local_ip="10.0.0.1", family=4,
                  dst_port=6081, auth=auth, local_name="hostA", remote_name="hostB",
                  local_cert_pem=pem("hostA-cert"))
    if auth is AuthMethod.PEER_CERT:
        return dataclasses.replace(base, remote_cert_pem=pem("hostB-rsa-cert"))
    return dataclasses.replace(base, ca_cert_pem=pem("cacert"))


CASES = {
    "geneve_psk": [row("gnv0", "geneve", **PSK)],
    "vxlan_custom_port_forceencaps": [row("vx0", "vxlan", dst_port="7000", ipsec_forceencaps="yes", **PSK)],
    "gre_ipv6_every_option": [row("gre0", "gre", local_ip="fd00::1", remote_ip="fd00::2", psk="x", **EVERY_OPTION)],
    "ipv6_no_local_ip": [row("gnv6", "geneve", remote_ip="fd00::2", psk="x")],
    "shared_peering": [row("gnv0", "geneve", **PSK), row("gre0", "gre", **PSK)],
    "peer_cert": [certificate_tunnel(AuthMethod.PEER_CERT)],
    "ca_cert": [certificate_tunnel(AuthMethod.CA_CERT)],
}


def tunnels_of(case: str) -> list[Tunnel]:
    given = CASES[case]
    if isinstance(given[0], Tunnel):
        return given
    validated = validate(desired(*given), CertificateFacts(), 0)
    assert not validated.invalid
    return list(validated.tunnels)


def render_strongswan(tunnels) -> str:
    (peering,) = group_peerings(tunnels, StrongSwanBackend.naming)[0].values()
    message = strongswan.render_conn(peering)
    return json.dumps(message, indent=2, sort_keys=True, default=lambda b: b.decode()) + "\n"


def render_libreswan(style: libreswan.Style):
    def render(tunnels) -> str:
        (peering,) = group_peerings(tunnels, libreswan.naming(style))[0].values()
        return libreswan.conn_file(peering, style)
    return render


RENDERERS = {
    "strongswan": (render_strongswan, "json"),
    "libreswan4": (render_libreswan(libreswan.Style(major=4)), "conf"),
    "libreswan5": (render_libreswan(libreswan.Style(major=5)), "conf"),
}


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("case", CASES)
def test_every_backend_renders_every_case_as_its_golden_file(case, renderer):
    render, extension = RENDERERS[renderer]
    assert_golden(f"{renderer}_{case}.{extension}", render(tunnels_of(case)))


@pytest.mark.parametrize("renderer", RENDERERS)
def test_every_applied_option_is_rendered_or_reported_not_applicable(renderer):
    """No accepted option is silently dropped: it shows in the output, or the backend says why not."""
    (tunnel,) = tunnels_of("gre_ipv6_every_option")
    text = RENDERERS[renderer][0]([tunnel])
    backend = StrongSwanBackend if renderer == "strongswan" else None
    skipped = dict(strongswan.not_applicable(tunnel.options) if backend else
                   libreswan.not_applicable(tunnel.options, libreswan.Style(major=int(renderer[-1]))))
    expected_in_output = {
        "strongswan": {"encap": "yes", "dpd_delay": "10s", "rekey_time": "28500s", "over_time": "300s",
                       "rand_time": "150s", "life_time": "3600s", "replay_window": "128", "mobike": "no",
                       "fragmentation": "yes", "keyingtries": "0", "aes256gcm16-esn": None},
        "libreswan4": {"encapsulation": "yes", "dpddelay": "10s", "retransmit-timeout": "90s",
                       "ikelifetime": "28800s", "salifetime": "3600s", "rekeymargin": "300s", "rekeyfuzz": "50%",
                       "replay-window": "128", "pfs": "no", "esn": "yes", "mobike": "no", "fragmentation": "yes",
                       "keyingtries": "%forever", "nat-keepalive": "yes"},
    }
    expected_in_output["libreswan5"] = expected_in_output["libreswan4"]
    for key, value in expected_in_output[renderer].items():
        needle = key if value is None else (f'"{key}": "{value}"' if renderer == "strongswan" else f"{key}={value}")
        assert needle in text, needle
    rendered_or_skipped = {name for name, _value in tunnel.options.in_force()}
    assert rendered_or_skipped == {
        "forceencaps", "dpd_delay", "dpd_timeout", "ike_lifetime", "sa_lifetime", "rekey_margin", "rekey_fuzz",
        "replay_window", "pfs", "esn", "retransmit_timeout", "nat_keepalive", "mobike", "fragmentation",
        "keyingtries"}
    assert set(skipped) == ({"dpd_timeout", "retransmit_timeout", "nat_keepalive"} if renderer == "strongswan"
                            else {"dpd_timeout"})
