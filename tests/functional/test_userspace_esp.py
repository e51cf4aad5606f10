"""Userspace ESP between two netdev hosts: real ovsdb-server, ovs-vswitchd (netdev datapath) and
`ovs-ipsec userspace-esp` in network namespaces; tcpdump on the underlay is the judge, and
`ovs-ipsec pcap-decrypt` the oracle for what the ESP carries.

This machine's kernel has no ESP, which does not matter here: the kernel only routes IP packets of
protocol 50 that our processes build. Interop with kernel ESP is the lab's (lab/guest/userspace.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from testsupport.netdev import Capture, NetdevHost, new_key
from testsupport.procs import wait_for

UNDERLAY = ("10.241.0.1", "10.241.0.2")
UNDERLAY6 = ("fd00:241::1", "fd00:241::2")
# kind -> (bridge, overlay subnet prefix, wire filter for its plaintext, overlay MTU at a 1500 path MTU)
KINDS = {
    "vxlan": ("br-vx", "10.242.1", "udp port 4789", 1416),
    "geneve": ("br-gnv", "10.242.2", "udp port 6081", 1416),
    "gre": ("br-gre", "10.242.3", "ip proto 47", 1428),
}
INNER_OK = {"arp-request", "arp-reply", "icmp-echo-request", "icmp-echo-reply"}


@pytest.fixture
def esp_hosts(sandbox):
    a = NetdevHost(sandbox.add_host("a", f"{UNDERLAY[0]}/24", f"{UNDERLAY6[0]}/64"))
    b = NetdevHost(sandbox.add_host("b", f"{UNDERLAY[1]}/24", f"{UNDERLAY6[1]}/64"))
    try:
        for host, peer in ((a, 1), (b, 0)):
            host.start_ovs()
            host.setup_underlay_bridge([UNDERLAY[peer], UNDERLAY6[peer]])
        yield a, b
    finally:
        for host in (a, b):
            host.stop()


class Keys:
    """Fresh SAs for each tunnel, and the file pcap-decrypt reads them from (mode 0600)."""

    def __init__(self, folder) -> None:
        self.path = folder / "sas"
        self.lines: list[str] = []
        self.next_spi = 0x1000

    def pair(self) -> tuple[dict, dict]:
        """Options for host a and for host b of one tunnel."""
        spi_ab, spi_ba = self.next_spi + 1, self.next_spi + 2
        self.next_spi += 16
        key_ab, key_ba = new_key(128), new_key(256)
        self.lines += [f"0x{spi_ab:x} {key_ab}", f"0x{spi_ba:x} {key_ba}"]
        self.path.touch(mode=0o600)
        self.path.write_text("\n".join(self.lines) + "\n")
        return ({"esp_out_spi": f"0x{spi_ab:x}", "esp_in_spi": f"0x{spi_ba:x}", "esp_out_key": key_ab,
                 "esp_in_key": key_ba},
                {"esp_out_spi": f"0x{spi_ba:x}", "esp_in_spi": f"0x{spi_ab:x}", "esp_out_key": key_ba,
                 "esp_in_key": key_ab})

    def secrets(self) -> list[str]:
        return [line.split()[1][2:] for line in self.lines]


def add_tunnels(a: NetdevHost, b: NetdevHost, keys: Keys, kinds=tuple(KINDS), family: int = 4, mtu=None) -> None:
    underlay = UNDERLAY if family == 4 else UNDERLAY6
    for kind in kinds:
        bridge, subnet, _, _ = KINDS[kind]
        options_a, options_b = keys.pair()
        for host, index, options in ((a, 0, options_a), (b, 1, options_b)):
            host.add_overlay_bridge(bridge, f"{subnet}.{index + 1}/24", mtu=mtu)
            host.add_tunnel(bridge, f"{kind}0", kind, underlay[index], underlay[1 - index], **options)


def decrypt(capture: Capture, keys: Keys) -> dict:
    out = subprocess.run([sys.executable, "-m", "ovs_ipsec.cli.main", "pcap-decrypt", capture.path,
                          "--sa-file", str(keys.path), "--json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def assert_no_secret(texts: list[str], keys: Keys) -> None:
    for text in texts:
        for secret in keys.secrets():
            assert secret not in text and secret[:16] not in text


def test_vxlan_geneve_gre_cross_as_esp_only(esp_hosts, sandbox):
    a, b = esp_hosts
    keys = Keys(sandbox.workdir)
    capture = Capture(b, sandbox.workdir / "underlay.pcap")
    add_tunnels(a, b, keys)
    for host in (a, b):
        host.start_esp()
        for kind in KINDS:
            host.wait_tunnel(f"{kind}0")
    pings = {}
    for kind, (_, subnet, _, _) in KINDS.items():
        a.ping(f"{subnet}.2", count=1, timeout=3)  # ARP on the overlay and OVS's tunnel neighbour
        pings[kind] = (a.ping(f"{subnet}.2", count=5), b.ping(f"{subnet}.1", count=5))
    capture.stop()
    for _kind, ((sent_ab, got_ab, out_ab), (sent_ba, got_ba, out_ba)) in pings.items():
        assert (sent_ab, got_ab) == (5, 5), out_ab
        assert (sent_ba, got_ba) == (5, 5), out_ba
    # The wire: ESP only, not one plaintext tunnel packet, from the first ovs-vsctl on.
    for kind, (_, _, wire_filter, _) in KINDS.items():
        assert capture.count(wire_filter) == 0, kind
    esp_packets = capture.count("ip proto 50")
    assert esp_packets >= 3 * 2 * 11
    # The oracle: every ESP packet decrypts to exactly the tunnel type it belongs to, carrying
    # the overlay's ARP and pings and nothing else, with sequence numbers never repeated.
    report = decrypt(capture, keys)
    counts = report["counts"]
    assert counts["esp"] == esp_packets and counts["decrypted"] == esp_packets, counts["status"]
    assert set(counts["inner"]) <= INNER_OK, counts["inner"]
    for kind, (_, subnet, _, _) in KINDS.items():
        carried = [p for p in report["packets"] if p["encapsulation"]["type"] == kind]
        requests = [p for p in carried if p["inner"]["kind"] == "icmp-echo-request"]
        assert {(p["inner"]["src"], p["inner"]["dst"]) for p in carried if "src" in p["inner"]} <= \
            {(f"{subnet}.1", f"{subnet}.2"), (f"{subnet}.2", f"{subnet}.1")}
        assert len(requests) >= 11 and sum(p["inner"]["kind"] == "icmp-echo-reply" for p in carried) >= 10
    assert all(sa["duplicate_seq"] == 0 for sa in counts["sa"].values())
    # Our counters agree with the wire, and nothing else was dropped.
    for host, src in ((a, UNDERLAY[0]), (b, UNDERLAY[1])):
        status = host.esp_status()
        sent = sum(t["outbound"]["packets"] for t in status["tunnels"])
        assert sent == sum(p["src"] == src for p in report["packets"])
        for tunnel in status["tunnels"]:
            assert tunnel["state"] == "active" and not tunnel["outbound"]["drops"] and not tunnel["inbound"]["drops"]
            assert tunnel["overlay_mtu"] == KINDS[tunnel["type"]][3]
    # -vfile:dbg included: python-ovs's jsonrpc would log the OVSDB updates, keys and all.
    assert_no_secret([a.esp_log(), b.esp_log(), json.dumps(a.esp_status()), a.esp_show_text()], keys)


def test_ipv6_underlay(esp_hosts, sandbox):
    a, b = esp_hosts
    keys = Keys(sandbox.workdir)
    capture = Capture(b, sandbox.workdir / "underlay.pcap")
    add_tunnels(a, b, keys, kinds=("vxlan",), family=6)
    for host in (a, b):
        host.start_esp()
        host.wait_tunnel("vxlan0")
    a.ping("10.242.1.2", count=1, timeout=3)
    sent, received, out = a.ping("10.242.1.2", count=5)
    capture.stop()
    assert (sent, received) == (5, 5), out
    assert capture.count("udp port 4789") == 0
    esp_packets = capture.count("ip6 proto 50")
    report = decrypt(capture, keys)
    assert esp_packets >= 10 and report["counts"]["decrypted"] == esp_packets
    assert a.esp_tunnel("vxlan0")["overlay_mtu"] == 1396  # 20 bytes less than over IPv4


def test_mtu_what_fits_passes_and_more_is_refused_with_icmp(esp_hosts, sandbox):
    a, b = esp_hosts
    keys = Keys(sandbox.workdir)
    add_tunnels(a, b, keys)
    for host in (a, b):
        host.start_esp()
    for kind, (_, subnet, _, mtu) in KINDS.items():
        assert a.wait_tunnel(f"{kind}0")["overlay_mtu"] == mtu
        peer = f"{subnet}.2"
        a.ping(peer, count=1, timeout=3)
        sent, received, out = a.ping(peer, count=2, size=mtu - 28, dont_fragment=True)
        assert received == 2, f"{kind}: the reported overlay MTU {mtu} must pass\n{out}"
        sent, received, out = a.ping(peer, count=2, size=mtu - 28 + 1, dont_fragment=True)
        assert received == 0
        # Not a black hole: the sender was told (ICMP inside the tunnel), so its kernel knows the
        # MTU now; and the drop is counted and logged.
        assert f"mtu = {mtu}" in out or f"mtu={mtu}" in out, out
        route = subprocess.run(a.host.netns("ip", "route", "get", peer), capture_output=True, text=True).stdout
        assert f"mtu {mtu}" in route, route
        tunnel = a.esp_tunnel(f"{kind}0")
        assert tunnel["outbound"]["drops"].get("too_big", 0) >= 1
    assert "more than the path MTU 1500" in a.esp_log()
    assert a.esp_status()["counters"]["icmp_too_big_sent"] >= 3


def test_without_keys_nothing_leaves_and_bad_keys_are_reported_not_printed(esp_hosts, sandbox):
    """A netdev tunnel with no or malformed ESP options goes through the bump like the others: it
    gets dropped there (counted, logged), never sent in plaintext."""
    a, b = esp_hosts
    keys = Keys(sandbox.workdir)
    capture = Capture(b, sandbox.workdir / "underlay.pcap")
    options_a, options_b = keys.pair()
    secret = keys.secrets()[0]
    a.add_overlay_bridge("br-vx", "10.242.1.1/24")
    a.add_tunnel("br-vx", "vxlan0", "vxlan", UNDERLAY[0], UNDERLAY[1], **{**options_a,
                 "esp_out_key": options_a["esp_out_key"][:-2]})  # one hex byte short
    a.add_overlay_bridge("br-gnv", "10.242.2.1/24")
    a.add_tunnel("br-gnv", "geneve0", "geneve", UNDERLAY[0], UNDERLAY[1])  # no ESP options at all
    a.start_esp()
    invalid = wait_for(lambda: next((t for t in a.esp_status()["tunnels"] if t["state"] == "invalid"), None), 20,
                       what="the invalid tunnel")
    assert invalid["name"] == "vxlan0"
    assert invalid["reason"].startswith("tunnel vxlan0: options:esp_out_key must be 0x and 40, 56 or 72 hex digits")
    for peer in ("10.242.1.2", "10.242.2.2"):
        a.ping(peer, count=3, timeout=1)
    capture.stop()
    assert capture.count("udp port 4789 or udp port 6081") == 0
    assert capture.count("ip proto 50") == 0
    status = a.esp_status()
    # The overlay's ARP requests, the only thing the kernel sends without an answer, one or more
    # per tunnel (OVS drops the very first while it resolves the tunnel's next hop).
    assert status["counters"]["unprotected_tunnel_packets"] >= 2
    log = a.esp_log()
    assert "tunnel vxlan0: options:esp_out_key must be" in log
    for port in (4789, 6081):
        assert f"dropped a tunnel packet (UDP port {port}) from {UNDERLAY[0]} to {UNDERLAY[1]}" in log
    assert_no_secret([log, json.dumps(status), a.esp_show_text()], keys)
    assert secret[:-2] not in log


REPLAY = """
import socket, sys
data = bytes.fromhex(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(int(sys.argv[3])):
    s.sendto(data, (sys.argv[2], 0))
"""


def first_esp_packet(path: str, src: str) -> bytes:
    """The IP packet of the first ESP packet from src in a capture (Ethernet link type)."""
    from ovs_ipsec.userspace.pcap import network_layer, read_capture

    for packet in read_capture(open(path, "rb").read()):
        layer = network_layer(packet)
        if layer and layer[0] == 0x0800 and layer[1][9] == 50 and layer[1][12:16] == bytes(map(int, src.split("."))):
            return layer[1]
    raise AssertionError("no ESP packet in the capture")


def test_replayed_and_forged_packets_are_dropped_restart_never_reuses_a_sequence_number(esp_hosts, sandbox):
    a, b = esp_hosts
    keys = Keys(sandbox.workdir)
    capture = Capture(b, sandbox.workdir / "underlay.pcap")
    add_tunnels(a, b, keys, kinds=("vxlan",))
    for host in (a, b):
        host.start_esp()
        host.wait_tunnel("vxlan0")
    a.ping("10.242.1.2", count=1, timeout=3)
    assert a.ping("10.242.1.2", count=3)[1] == 3
    capture.stop()
    packet = first_esp_packet(capture.path, UNDERLAY[0])
    forged = bytearray(packet)
    forged[24:28] = (1 << 30).to_bytes(4, "big")  # a sequence number the window has not seen
    forged[-20] ^= 0x01
    before = b.esp_tunnel("vxlan0")["inbound"]
    for data, count in ((packet, 3), (bytes(forged), 2)):
        subprocess.run(a.host.netns(sys.executable, "-c", REPLAY, data.hex(), UNDERLAY[1], str(count)), check=True)
    after = wait_for(lambda: (t := b.esp_tunnel("vxlan0"))["inbound"]["drops"].get("auth_failed") == 2 and t, 10,
                     what="the forged packets to be counted")
    assert after["inbound"]["drops"].get("replay", 0) == 3
    assert after["inbound"]["packets"] == before["packets"]
    # A restart with the same manual key resumes after the reserved block: no (key, IV) pair is
    # ever used twice, and the peer's replay window accepts what follows.
    seq_before = a.esp_tunnel("vxlan0")["out_seq"]
    a.stop_esp()
    a.start_esp()
    a.wait_tunnel("vxlan0")
    assert a.ping("10.242.1.2", count=3)[1] == 3
    seq_after = a.esp_tunnel("vxlan0")["out_seq"]
    assert seq_before < 100 and seq_after > 1 << 20  # past the first run's reserved block of 2^20
    assert not b.esp_tunnel("vxlan0")["inbound"]["drops"].get("too_old")


def test_new_keys_in_ovsdb_take_effect_on_both_ends(esp_hosts, sandbox):
    a, b = esp_hosts
    keys = Keys(sandbox.workdir)
    add_tunnels(a, b, keys, kinds=("geneve",))
    for host in (a, b):
        host.start_esp()
        host.wait_tunnel("geneve0")
    a.ping("10.242.2.2", count=1, timeout=3)
    assert a.ping("10.242.2.2", count=2)[1] == 2
    options_a, options_b = keys.pair()
    for host, options in ((a, options_a), (b, options_b)):
        host.vsctl("set", "interface", "geneve0", *[f"options:{k}={v}" for k, v in options.items()])
    for host, options in ((a, options_a), (b, options_b)):
        wait_for(lambda h=host, o=options: h.esp_tunnel("geneve0")["out_spi"] == f"0x{int(o['esp_out_spi'], 16):08x}",
                 20, what="the new SPI")
    time.sleep(0.2)
    assert a.ping("10.242.2.2", count=3)[1] == 3
    assert a.esp_tunnel("geneve0")["outbound"]["packets"] == 3
    assert re.search(r"tunnel geneve0: userspace ESP updated", a.esp_log())
