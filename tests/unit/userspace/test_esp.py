"""The ESP codec: published AES-GCM ESP vectors, round trips, tampering, padding, replay window."""

from __future__ import annotations

import os
import struct

import pytest

from ovs_ipsec.userspace import esp
from ovs_ipsec.userspace.esp import AeadKey, ReplayWindow, SaCipher

# "Test Cases for the use of GCM in IPsec ESP" (draft-mcgrew-gcm-test-01), the cases with 32-bit
# sequence numbers (an 8-byte AAD = SPI || seq): the ESP header, the IV, ciphertext and ICV as
# they appear on the wire. Case 4 is left out: its SPI is 0, which RFC 4303 reserves.
VECTORS = {
    "case 2 (AES-192, pad length 0)": dict(
        header="0000a5f80000000a", key="feffe9928665731c6d6a8f9467308308feffe9928665731c", salt="cafebabe",
        iv="facedbaddecaf888",
        ct="a5b1f8066029aea40e598b8122de02420938b3ab33f828e687b8858b5bfbdbd0315b27452144cc77",
        icv="95457b9652037f5318027b5b4cd7a636", payload_len=38, next_header=1),
    "case 3 (AES-256, padding 1 2)": dict(
        header="4a2cbfe300000002", key="abbccddef00112233445566778899aababbccddef00112233445566778899aab",
        salt="11223344", iv="0102030405060708",
        ct="ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763748a637985771d347f0545659f14e99def842d8e",
        icv="b335f4eecfdbf831824b4c4915956c96", payload_len=48, next_header=1),
    "case 5 (AES-128, empty payload, seq 2^32-1)": dict(
        header="335467aeffffffff", key="7d773d00c144c525ac619d18c84a3f47", salt="d9664267", iv="43457e9182443bc6",
        ct="437f866b", icv="cb3f699fe9b0822bac961c4504bef270", payload_len=0, next_header=1),
}


def cipher_of(vector: dict) -> SaCipher:
    spi = int(vector["header"][:8], 16)
    return SaCipher.create(spi, AeadKey(bytes.fromhex(vector["key"]), bytes.fromhex(vector["salt"])))


def wire_of(vector: dict) -> bytes:
    return bytes.fromhex(vector["header"] + vector["iv"] + vector["ct"] + vector["icv"])


@pytest.mark.parametrize("name", VECTORS)
def test_published_vectors_open_and_seal_byte_for_byte(name):
    vector = VECTORS[name]
    cipher, wire = cipher_of(vector), wire_of(vector)
    opened = esp.open_esp(cipher, wire)
    assert opened.seq == int(vector["header"][8:], 16)
    assert (len(opened.payload), opened.next_header) == (vector["payload_len"], vector["next_header"])
    assert esp.seal(cipher, opened.seq, bytes.fromhex(vector["iv"]), opened.payload, opened.next_header) == wire


@pytest.mark.parametrize("key_len", [16, 24, 32])
@pytest.mark.parametrize("payload_len", [0, 1, 2, 3, 4, 5, 63, 64, 1400, 1446])
def test_round_trip_layout_and_overhead(key_len, payload_len):
    cipher = SaCipher.create(0x1001, AeadKey(os.urandom(key_len), os.urandom(4)))
    payload = os.urandom(payload_len)
    packet = esp.seal(cipher, 7, esp.iv_for(7), payload, 17)
    assert struct.unpack_from("!II", packet) == (0x1001, 7)
    assert packet[8:16] == struct.pack("!Q", 7)  # the IV is the sequence number
    assert len(packet) == payload_len + esp.esp_overhead(payload_len)
    assert (len(packet) - 8 - 8 - 16) % 4 == 0  # RFC 4303 section 2.4 alignment
    assert 34 <= esp.esp_overhead(payload_len) <= 37
    opened = esp.open_esp(cipher, packet)
    assert (opened.seq, opened.next_header, opened.payload) == (7, 17, payload)


def test_padding_is_1_2_3_and_checked():
    key = AeadKey(os.urandom(16), os.urandom(4))
    cipher = SaCipher.create(0x2000, key)
    packet = esp.seal(cipher, 1, esp.iv_for(1), b"xyz", 17)  # 3 + 2 -> 3 bytes of padding: 1 2 3
    plaintext = cipher.aead.decrypt(key.salt + packet[8:16], packet[16:], packet[:8])
    assert plaintext == b"xyz\x01\x02\x03\x03\x11"
    # A peer padding with zeros is refused (RFC 4303 2.4: the receiver SHOULD check).
    bad = cipher.aead.encrypt(key.salt + packet[8:16], b"xyz\x00\x00\x00\x03\x11", packet[:8])
    with pytest.raises(esp.BadPadding):
        esp.open_esp(cipher, packet[:16] + bad)
    # A pad length longer than the plaintext.
    worse = cipher.aead.encrypt(key.salt + packet[8:16], b"\x09\x11", packet[:8])
    with pytest.raises(esp.BadPadding):
        esp.open_esp(cipher, packet[:16] + worse)


@pytest.mark.parametrize("where", ["seq", "iv", "ciphertext", "icv"])
def test_any_flipped_bit_fails_authentication(where):
    cipher = SaCipher.create(0x3000, AeadKey(os.urandom(32), os.urandom(4)))
    packet = bytearray(esp.seal(cipher, 5, esp.iv_for(5), os.urandom(100), 17))
    offset = {"seq": 6, "iv": 10, "ciphertext": 40, "icv": len(packet) - 3}[where]
    packet[offset] ^= 0x01
    with pytest.raises(esp.AuthenticationFailed) as raised:
        esp.open_esp(cipher, bytes(packet))
    assert raised.value.counter == "auth_failed"


def test_wrong_key_wrong_spi_and_short_packets_are_refused():
    cipher = SaCipher.create(0x3000, AeadKey(os.urandom(16), os.urandom(4)))
    other = SaCipher.create(0x3000, AeadKey(os.urandom(16), os.urandom(4)))
    packet = esp.seal(cipher, 1, esp.iv_for(1), b"payload", 17)
    with pytest.raises(esp.AuthenticationFailed):
        esp.open_esp(other, packet)
    with pytest.raises(esp.MalformedEsp):
        esp.open_esp(SaCipher.create(0x3001, cipher.key), packet)
    with pytest.raises(esp.MalformedEsp):
        esp.open_esp(cipher, packet[:esp.MIN_ESP_LEN - 1])


def test_sequence_numbers_and_iv_bounds():
    cipher = SaCipher.create(0x100, AeadKey(os.urandom(16), os.urandom(4)))
    assert esp.open_esp(cipher, esp.seal(cipher, esp.MAX_SEQ, esp.iv_for(esp.MAX_SEQ), b"", 59)).seq == esp.MAX_SEQ
    for seq in (0, esp.MAX_SEQ + 1):
        with pytest.raises(ValueError):
            esp.seal(cipher, seq, esp.iv_for(1), b"", 17)
    with pytest.raises(ValueError):
        esp.seal(cipher, 1, b"short", b"", 17)
    with pytest.raises(ValueError):
        SaCipher.create(0, cipher.key)


@pytest.mark.parametrize("budget", range(40, 80))
def test_max_payload_len_is_exactly_what_fits(budget):
    largest = esp.max_payload_len(budget)
    assert largest + esp.esp_overhead(largest) <= budget
    assert largest + 1 + esp.esp_overhead(largest + 1) > budget


def test_key_material_is_never_in_repr():
    material = bytes(range(1, 21))
    key = AeadKey.from_material(material)
    assert (key.key, key.salt, key.bits) == (material[:16], material[16:], 128)
    cipher = SaCipher.create(0x1234, key)
    for text in (repr(key), repr(cipher), str(cipher)):
        assert material[:16].hex() not in text and "\\x01\\x02" not in text
    with pytest.raises(ValueError):
        AeadKey.from_material(bytes(19))


# -- anti-replay (RFC 4303 section 3.4.3) --------------------------------------------------------------

def receive(window: ReplayWindow, seq: int) -> tuple[ReplayWindow, str | None]:
    refused = window.check(seq)
    return (window if refused else window.accept(seq)), refused


def test_replay_window_accepts_new_and_late_refuses_duplicates_and_too_old():
    window = ReplayWindow(32)
    for seq in (1, 2, 3, 10):
        window, refused = receive(window, seq)
        assert refused is None
    assert window.top == 10
    assert receive(window, 3)[1] == "replay"
    window, refused = receive(window, 5)  # late but inside the window and never seen
    assert refused is None
    assert receive(window, 5)[1] == "replay"
    window, _ = receive(window, 40)  # 40 - 32 = 8: 8 is the oldest that falls out
    assert window.check(8) == "too_old"
    assert window.check(9) is None
    assert window.check(10) == "replay"
    assert window.check(0) == "replay"


def test_replay_window_large_jump_clears_the_bitmap():
    window = ReplayWindow(64)
    for seq in range(1, 65):
        window = window.accept(seq)
    window = window.accept(1000)
    assert window.bitmap == 1
    assert window.check(999) is None and window.check(936) == "too_old"


def test_replay_window_near_the_end_of_the_sequence_space():
    window = ReplayWindow(64, top=esp.MAX_SEQ - 1, bitmap=1)
    window, refused = receive(window, esp.MAX_SEQ)
    assert refused is None and window.top == esp.MAX_SEQ
    assert window.check(esp.MAX_SEQ) == "replay"
    assert window.check(esp.MAX_SEQ - 2) is None
    # Without extended sequence numbers nothing comes after 2^32-1: seq 1 is far too old now.
    assert window.check(1) == "too_old"


def test_replay_window_off():
    window = ReplayWindow(0)
    for seq in (5, 5, 1):
        window, refused = receive(window, seq)
        assert refused is None
    with pytest.raises(ValueError):
        ReplayWindow(-1)


def test_a_forgery_never_moves_the_window():
    """The datapath checks, then verifies the ICV, then accepts: a packet with a high sequence
    number that fails authentication must leave the window where it was."""
    cipher = SaCipher.create(0x5000, AeadKey(os.urandom(16), os.urandom(4)))
    window = ReplayWindow(64).accept(10)
    forged = bytearray(esp.seal(cipher, 1_000_000, esp.iv_for(1_000_000), b"x" * 20, 17))
    forged[-1] ^= 1
    assert window.check(1_000_000) is None
    with pytest.raises(esp.AuthenticationFailed):
        esp.open_esp(cipher, bytes(forged))
    assert window.check(11) is None and window.top == 10
