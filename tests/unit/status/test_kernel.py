"""The kernel's view per tunnel (tunnels/show), and upstream's ipsec/status shape."""

from __future__ import annotations

import ast

from ovs_ipsec.model import GlobalConfig, TunnelState
from ovs_ipsec.netlink.xfrm import KernelPolicy, KernelSA, Selector
from ovs_ipsec.status.kernel import KernelView, sa_line, tunnel_policies, tunnel_states
from ovs_ipsec.status.render import render_show, render_upstream_status
from ovs_ipsec.status.snapshot import StatusSnapshot, TunnelStatus

TUNNEL = TunnelStatus(name="gnv", type="geneve", local_ip="10.0.0.1", remote_ip="10.0.0.2", auth="psk",
                      state=TunnelState.ESTABLISHED, reason=None, ike_sas=1, child_sas=2, dst_port=6081,
                      conn="ovsipsec-10.0.0.2-0123456789", ike_sa_ids=("7",), encrypting=True,
                      installed_children=("gnv-in-abcdef", "gnv-out-abcdef"))
OUT = KernelPolicy(Selector("10.0.0.1/32", "10.0.0.2/32", "udp", None, 6081), "out", "allow", 2999, 1, None, 1)
IN = KernelPolicy(Selector("10.0.0.2/32", "10.0.0.1/32", "udp", 6081, None), "in", "allow", 2999, 2, None, 1)
GUARD = KernelPolicy(Selector("0.0.0.0/0", "0.0.0.0/0", "udp", None, 6081), "out", "block", 257867777, 3, (0, 1), 0)
OTHER_PEER = KernelPolicy(Selector("10.0.0.1/32", "10.0.0.9/32", "udp", None, 6081), "out", "allow", 2999, 4, None, 1)
OTHER_PORT = KernelPolicy(Selector("10.0.0.1/32", "10.0.0.2/32", "udp", None, 4789), "out", "allow", 2999, 5, None, 1)
SA = KernelSA("10.0.0.1", "10.0.0.2", "esp", 0xC1C2C3C4, "transport", 1, OUT.selector, ("rfc4106(gcm(aes))",),
              False, 1500, 3, 32)


def test_a_tunnel_shows_its_own_policies_and_the_guard_not_others():
    lines = tunnel_policies(TUNNEL, (OUT, IN, GUARD, OTHER_PEER, OTHER_PORT))
    assert lines == [
        "out 10.0.0.1/32 -> 10.0.0.2/32 udp dport 6081 allow priority 2999 requires ESP",
        "in  10.0.0.2/32 -> 10.0.0.1/32 udp sport 6081 allow priority 2999 requires ESP",
        "out 0.0.0.0/0 -> 0.0.0.0/0 udp dport 6081 block priority 257867777 mark 0x0/0x1 (plaintext guard)",
    ]
    assert tunnel_states(TUNNEL, (SA,)) == [sa_line(SA)]
    assert sa_line(SA) == ("10.0.0.1 -> 10.0.0.2 esp spi 0xc1c2c3c4 transport reqid 1 rfc4106(gcm(aes)) "
                           "sel 10.0.0.1/32 -> 10.0.0.2/32 udp dport 6081: 1500 bytes, 3 packets")


def test_tunnels_show_has_upstreams_kernel_sections():
    snapshot = StatusSnapshot((TUNNEL,), GlobalConfig(), None, 0)
    text = render_show(snapshot, KernelView((OUT, IN), (SA,)))
    assert "Kernel policies installed:\n  out 10.0.0.1/32 -> 10.0.0.2/32" in text
    assert "Kernel security associations installed:\n  10.0.0.1 -> 10.0.0.2 esp spi 0xc1c2c3c4" in text
    unreadable = render_show(snapshot, KernelView(error="cannot read the kernel's XFRM SAs: Permission denied"))
    assert "Kernel security associations installed:\n  cannot read the kernel's XFRM SAs" in unreadable


def test_ipsec_status_has_upstreams_shape_for_the_tools_that_parse_it():
    gre = TunnelStatus(name="gre0", type="gre", local_ip="10.0.0.1", remote_ip="10.0.0.3", auth="psk",
                       state=TunnelState.ESTABLISHED, reason=None, ike_sa_ids=("9",), conn="c",
                       installed_children=("ovsipsec-10.0.0.3-0123456789_gre0-gre-abcdef",))
    negotiating = TunnelStatus(name="vx", type="vxlan", local_ip="10.0.0.1", remote_ip="10.0.0.4", auth="psk",
                               state=TunnelState.NEGOTIATING, reason="x")
    text = render_upstream_status(StatusSnapshot((TUNNEL, gre, negotiating), GlobalConfig(), None, 0))
    parsed = ast.literal_eval(text)
    assert set(parsed) == {"gnv", "gre0"}  # only tunnels whose child SAs are installed
    assert set(parsed["gnv"]) == {"gnv-in-1", "gnv-out-1"} and set(parsed["gre0"]) == {"gre0-1"}
    assert "'" not in "".join(value for inner in parsed.values() for value in inner.values())
