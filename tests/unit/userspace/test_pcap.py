"""pcap-decrypt: capture formats, what it finds inside, and what it refuses."""

from __future__ import annotations

import json
import struct

import pytest

from ovs_ipsec.cli.main import main
from ovs_ipsec.userspace import esp, frames, pcap
from ovs_ipsec.userspace.esp import AeadKey, SaCipher
from ovs_ipsec.userspace.xfrm import KnownSa, SaSpecError, parse_sa_argument, parse_sa_text

KEY = "0x" + "5a" * 16 + "0a0b0c0d"
MAC_1, MAC_2 = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
OUTER_A, OUTER_B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def cipher(spi=0x1001, key=KEY) -> SaCipher:
    return SaCipher.create(spi, AeadKey.from_material(bytes.fromhex(key[2:])))


def inner_frame(kind="ping") -> bytes:
    if kind == "arp":
        return frames.arp_frame(1, MAC_1, MAC_1, bytes([192, 0, 0, 1]), bytes(6), bytes([192, 0, 0, 2]),
                                frames.BROADCAST)
    icmp = struct.pack("!BBHHH", 8, 0, 0, 7, 3) + b"x" * 8
    return MAC_2 + MAC_1 + frames.ETHERTYPE_IPV4 + frames.ipv4_header(
        0, 20 + len(icmp), 0, 0x4000, 64, 1, bytes([192, 0, 0, 1]), bytes([192, 0, 0, 2])) + icmp


def esp_frame(payload: bytes, next_header: int, seq: int, sa: SaCipher) -> bytes:
    sealed = esp.seal(sa, seq, esp.iv_for(seq), payload, next_header)
    ip = frames.ipv4_header(0, 20 + len(sealed), 0, 0x4000, 64, 50, OUTER_A, OUTER_B)
    return MAC_2 + MAC_1 + frames.ETHERTYPE_IPV4 + ip + sealed


def vxlan(inner: bytes, vni=5, port=4789) -> bytes:
    return struct.pack("!HHHH", 40000, port, 16 + len(inner), 0) + struct.pack("!II", 0x08000000, vni << 8) + inner


def geneve(inner: bytes, vni=6) -> bytes:
    option = struct.pack("!HBB", 0x0102, 0x80, 1) + b"\x00" * 4  # one 8-byte option, as OVN sends
    return (struct.pack("!HHHH", 40000, 6081, 16 + len(option) + len(inner), 0)
            + struct.pack("!BBHI", 2, 0, 0x6558, vni << 8) + option + inner)


def gre(inner: bytes, key=9) -> bytes:
    return struct.pack("!HHI", 0x2000, 0x6558, key) + inner


def pcap_file(frames_: list[bytes], linktype=1) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for i, frame in enumerate(frames_):
        out += struct.pack("<IIII", 1_700_000_000 + i, 500, len(frame), len(frame)) + frame
    return out


def pcapng_file(frames_: list[bytes]) -> bytes:
    def block(kind: int, body: bytes) -> bytes:
        body += b"\x00" * (-len(body) % 4)
        return struct.pack("<II", kind, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    out = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    out += block(1, struct.pack("<HHI", 1, 0, 65535) + struct.pack("<HHB3x", 9, 1, 9) + b"\x00" * 4)
    for i, frame in enumerate(frames_):
        stamp = (1_700_000_000 + i) * 10**9
        out += block(6, struct.pack("<IIIII", 0, stamp >> 32, stamp & 0xFFFFFFFF, len(frame), len(frame)) + frame)
    return out


def test_vxlan_geneve_gre_decrypted_and_described():
    sa = cipher()
    capture = pcap_file([
        esp_frame(vxlan(inner_frame("arp")), 17, 1, sa),
        esp_frame(vxlan(inner_frame()), 17, 2, sa),
        esp_frame(geneve(inner_frame()), 17, 3, sa),
        esp_frame(gre(inner_frame()), 47, 4, sa),
        MAC_2 + MAC_1 + frames.ETHERTYPE_ARP + b"\x00" * 28,  # not IP: counted, not listed
    ])
    report = pcap.decrypt_capture(capture, [KnownSa(0x1001, sa.key)])
    assert report.counts["packets"] == 5 and report.counts["esp"] == 4 and report.counts["decrypted"] == 4
    arp, ping, gen, gr = report.esp
    assert arp.summary == "VXLAN vni 5: 02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff ARP who-has 192.0.0.2 tell 192.0.0.1"
    assert ping.encapsulation == {"type": "vxlan", "sport": 40000, "dport": 4789, "vni": 5}
    assert (ping.inner["kind"], ping.inner["src"], ping.inner["icmp_id"], ping.inner["icmp_seq"]) == \
        ("icmp-echo-request", "192.0.0.1", 7, 3)
    assert gen.encapsulation["type"] == "geneve" and gen.encapsulation["options_len"] == 8
    assert gen.inner["kind"] == "icmp-echo-request"
    assert gr.summary.startswith("GRE key 9: ") and gr.inner["kind"] == "icmp-echo-request"
    assert report.counts["sa"]["0x00001001"] == {"packets": 4, "decrypted": 4, "first_seq": 1, "last_seq": 4,
                                                  "duplicate_seq": 0}
    assert report.counts["inner"] == {"arp-request": 1, "icmp-echo-request": 3}
    text = pcap.render_text(report)
    assert "5 packets, 4 ESP, 4 decrypted" in text and KEY[2:12] not in text


def test_unknown_spi_wrong_key_and_duplicates_are_reported():
    sa, other = cipher(), cipher(0x2002)
    good = esp_frame(vxlan(inner_frame()), 17, 1, sa)
    capture = pcap_file([good, good, esp_frame(vxlan(inner_frame()), 17, 2, other),
                         esp_frame(vxlan(inner_frame()), 17, 3, cipher(0x1001, "0x" + "00" * 20))])
    report = pcap.decrypt_capture(capture, [KnownSa(0x1001, sa.key)])
    assert [d.status for d in report.esp] == ["decrypted", "decrypted", "unknown_spi", "auth_failed"]
    assert report.counts["sa"]["0x00001001"]["duplicate_seq"] == 1


def test_pcapng_and_linux_cooked_captures():
    sa = cipher()
    frame = esp_frame(vxlan(inner_frame()), 17, 1, sa)
    assert pcap.decrypt_capture(pcapng_file([frame]), [KnownSa(0x1001, sa.key)]).counts["decrypted"] == 1
    cooked = struct.pack("!HHH8sH", 0, 1, 6, MAC_1 + b"\x00\x00", 0x0800) + frame[14:]
    report = pcap.decrypt_capture(pcap_file([cooked], linktype=pcap.LINKTYPE_SLL), [KnownSa(0x1001, sa.key)])
    assert report.counts["decrypted"] == 1
    raw = pcap.decrypt_capture(pcap_file([frame[14:]], linktype=pcap.LINKTYPE_RAW), [KnownSa(0x1001, sa.key)])
    assert raw.esp[0].time == pytest.approx(1_700_000_000.0005)


def test_not_a_capture():
    with pytest.raises(pcap.PcapError):
        pcap.decrypt_capture(b"hello world, not a pcap", [])


def test_sa_arguments_lines_and_ip_xfrm_state():
    assert parse_sa_argument(f"0x1001:{KEY}").spi == 0x1001
    assert parse_sa_argument(f"4097:{KEY}").spi == 4097
    for bad in (f"0x1001:{KEY[:-2]}", f"0x1001 {KEY}", f"0x1001:{KEY}\n;", "0:" + KEY):
        with pytest.raises(SaSpecError) as raised:
            parse_sa_argument(bad)
        assert KEY[2:10] not in str(raised.value)
    assert [sa.spi for sa in parse_sa_text(f"# ours\n0x1001 {KEY}\n\n0x1002 {KEY}\n")] == [0x1001, 0x1002]
    state = f"""src 10.0.0.1 dst 10.0.0.2
\tproto esp spi 0x00001001 reqid 0 mode transport
\treplay-window 0
\taead rfc4106(gcm(aes)) {KEY} 128
\tanti-replay context: seq 0x0, oseq 0x5, bitmap 0x00000000
\tsel src 10.0.0.1/32 dst 10.0.0.2/32 proto udp dport 4789
src 10.0.0.2 dst 10.0.0.1
\tproto esp spi 0xc0de0001 reqid 1 mode tunnel
\treplay-window 32 flag af-unspec
\tauth-trunc hmac(sha256) 0x00 128
\tenc cbc(aes) 0x00
src 10.0.0.2 dst 10.0.0.1
\tproto esp spi 0x00001002 reqid 0 mode transport
\treplay-window 0
\taead rfc4106(gcm(aes)) 0x{"77" * 32}01020304 128
"""
    sas = parse_sa_text(state)
    assert [(sa.spi, sa.src, sa.dst, sa.mode, sa.key.bits) for sa in sas] == [
        (0x1001, "10.0.0.1", "10.0.0.2", "transport", 128), (0x1002, "10.0.0.2", "10.0.0.1", "transport", 256)]


def test_the_cli_prints_lines_and_json(tmp_path, capsys):
    sa = cipher()
    (tmp_path / "c.pcap").write_bytes(pcap_file([esp_frame(vxlan(inner_frame()), 17, 1, sa)]))
    (tmp_path / "keys").write_text(f"0x1001 {KEY}\n")
    assert main(["pcap-decrypt", str(tmp_path / "c.pcap"), "--sa-file", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    assert "ESP spi 0x00001001 seq 1: VXLAN vni 5: " in out and "1 packets, 1 ESP, 1 decrypted" in out
    assert main(["pcap-decrypt", str(tmp_path / "c.pcap"), "--sa", f"0x1001:{KEY}", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["counts"]["decrypted"] == 1 and document["packets"][0]["inner"]["kind"] == "icmp-echo-request"
    assert main(["pcap-decrypt", str(tmp_path / "c.pcap")]) == 1
    assert "no SA given" in capsys.readouterr().err


def test_esn_sas_from_ip_xfrm_state_decrypt_with_the_high_half_in_the_aad():
    """LibreSwan negotiates ESN by default (`flag esn`): the AAD is SPI || seq high || seq low."""
    sa = cipher()
    sealed = esp.seal(sa, 1, esp.iv_for(1), vxlan(inner_frame()), 17, seq_hi=0)
    frame = MAC_2 + MAC_1 + frames.ETHERTYPE_IPV4 + frames.ipv4_header(0, 20 + len(sealed), 0, 0, 64, 50, OUTER_A,
                                                                        OUTER_B) + sealed
    state = f"""src 10.0.0.1 dst 10.0.0.2
\tproto esp spi 0x00001001(4097) reqid 16389(0x00004005) mode transport
\treplay-window 0 seq 0x00000000 flag esn (0x10000000)
\taead rfc4106(gcm(aes)) {KEY} (160 bits) 128
\tsel src 10.0.0.1/32 dst 10.0.0.2/32 proto gre uid 0
"""
    (known,) = parse_sa_text(state)
    assert known.esn and known.sel_proto == 47
    assert pcap.decrypt_capture(pcap_file([frame]), [known]).counts["decrypted"] == 1
    without_esn = KnownSa(known.spi, known.key)
    assert pcap.decrypt_capture(pcap_file([frame]), [without_esn]).esp[0].status == "auth_failed"
