"""IKE-negotiated SAs read back from the kernel: which tunnel each belongs to, and when to refuse."""

from __future__ import annotations

import uuid

from ovs_ipsec.userspace.keysource import tunnels_from_kernel
from ovs_ipsec.userspace.sa import TunnelRow, validate_ike
from ovs_ipsec.userspace.xfrm import parse_xfrm_state



def key(spi: int, bits: int = 256) -> str:
    return "0x" + (f"{spi:02x}" * (bits // 8 + 4))


def state(src, dst, spi, sel="proto udp dport 4789", mark="0x2a/0xffffffff", added="2026-12-07 06:00:00"):
    mark_line = f"\n\tmark {mark}" if mark else ""
    return f"""src {src} dst {dst}
\tproto esp spi 0x{spi:08x}({spi}) reqid 1(0x00000001) mode transport
\treplay-window 0 seq 0x00000000 flag  (0x00000000){mark_line}
\taead rfc4106(gcm(aes)) {key(spi)} (288 bits) 128
\tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\tlifetime current:
\t  0(bytes), 0(packets)
\t  add {added} use -
\tstats:
\t  replay-window 0 replay 0 failed 0
\tsel src {src}/32 dst {dst}/32 {sel}
"""


def rows(kind="vxlan", datapath="netdev", **options):
    merged = {"local_ip": "10.0.0.1", "remote_ip": "10.0.0.2", "psk": "swordfish", **options}
    return [TunnelRow(uuid=str(uuid.uuid4()), name="tun", type=kind, options=tuple(sorted(merged.items())),
                      bridge="br-ipsec", datapath_type=datapath)]


def test_ip_s_xfrm_state_is_parsed_with_selector_mark_and_age():
    (sa,) = parse_xfrm_state(state("10.0.0.1", "10.0.0.2", 0xC1))
    assert (sa.spi, sa.src, sa.dst, sa.mode, sa.sel_proto, sa.sel_dport, sa.mark, sa.added) == (
        0xC1, "10.0.0.1", "10.0.0.2", "transport", 17, 4789, "0x2a/0xffffffff", "2026-12-07 06:00:00")
    assert sa.key.bits == 256


def test_netdev_ike_tunnels_get_the_newest_inert_sa_of_each_direction():
    ike, invalid = validate_ike(rows())
    assert not invalid and [t.name for t in ike] == ["tun"]
    listing = "".join([state("10.0.0.1", "10.0.0.2", 0xC1, added="2026-12-07 06:00:00"),
                       state("10.0.0.1", "10.0.0.2", 0xC3, added="2026-12-07 07:00:00"),  # rekeyed
                       state("10.0.0.2", "10.0.0.1", 0xC2),
                       state("10.0.0.2", "10.0.0.1", 0xC4, sel="proto udp dport 6081"),  # another tunnel
                       state("10.0.0.1", "10.0.0.9", 0xC5)])
    (tunnel,), waiting = tunnels_from_kernel(ike, parse_xfrm_state(listing))
    assert not waiting
    assert (tunnel.outbound.spi, tunnel.inbound.spi, tunnel.fresh_keys) == (0xC3, 0xC2, True)


def test_waiting_for_ike_and_refusing_live_kernel_sas():
    ike, _ = validate_ike(rows())
    tunnels, waiting = tunnels_from_kernel(ike, parse_xfrm_state(state("10.0.0.1", "10.0.0.2", 0xC1)))
    assert not tunnels and waiting[0].state == "pending" and "waiting for IKE" in waiting[0].reason
    live = state("10.0.0.1", "10.0.0.2", 0xC1, mark=None) + state("10.0.0.2", "10.0.0.1", 0xC2)
    tunnels, refused = tunnels_from_kernel(ike, parse_xfrm_state(live))
    assert not tunnels and "is live (no mark)" in refused[0].reason and refused[0].state == "invalid"
    assert key(0xC1)[2:] not in refused[0].reason


def test_gre_selector_and_which_rows_are_ike_tunnels():
    ike, _ = validate_ike(rows(kind="gre"))
    listing = state("10.0.0.1", "10.0.0.2", 0xC1, sel="proto gre") + state("10.0.0.2", "10.0.0.1", 0xC2, sel="proto gre")
    (tunnel,), _ = tunnels_from_kernel(ike, parse_xfrm_state(listing))
    assert tunnel.protocol == 47 and tunnel.dst_port is None
    assert validate_ike(rows(datapath="system")) == ((), ())  # the monitor's, not ours
    assert validate_ike(rows(psk=None)) == ((), ())  # not IKE-keyed
    manual = rows(esp_out_spi="0x1001")  # both: validate() refuses it, not validate_ike()
    assert validate_ike(manual) == ((), ())
    _, invalid = validate_ike(rows(remote_ip="flow"))
    assert "options:remote_ip must be a literal" in invalid[0].reason
