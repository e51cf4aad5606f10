"""ESP (RFC 4303) with AES-GCM (RFC 4106): the pure codec. Bytes in, bytes out, no I/O.

Layout of what `seal` returns and `open_esp` takes (transport mode: the IP header stays outside):

    0                   1                   2                   3
    +-------------------------------+-------------------------------+
    |                 Security Parameters Index (SPI)               |  \\
    +---------------------------------------------------------------+   | authenticated
    |                   Sequence Number (low 32 bits)               |  /  (AAD)
    +---------------------------------------------------------------+
    |            Initialization Vector (8 bytes, explicit)          |
    +---------------------------------------------------------------+
    |   Payload (UDP + VXLAN/Geneve, or GRE, and the inner frame)   |  \\
    |                ... | Padding (0-3: 1, 2, 3) | Pad Len | Next  |   | encrypted
    +---------------------------------------------------------------+  /
    |              Integrity Check Value (16 bytes, GCM tag)        |
    +---------------------------------------------------------------+

The GCM nonce is salt (4 bytes, from the key material) || IV (8 bytes); the AAD is SPI || sequence
number (RFC 4106 section 5, without extended sequence numbers). The IV is chosen by the caller:
it must never repeat under one key, and the datapath uses the 64-bit sequence number for it
(RFC 4106 section 3.1 allows a counter), which the sequence reservation file keeps unique across
restarts.

Anti-replay (RFC 4303 section 3.4.3) is a sliding window over the sequence numbers: `ReplayWindow`
is checked before the (expensive) integrity check and advanced only after it passed, so a forged
packet can never move the window.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import OvsIpsecError

ESP_HEADER_LEN = 8  # SPI + sequence number
IV_LEN = 8
ICV_LEN = 16
SALT_LEN = 4
TRAILER_LEN = 2  # pad length + next header
ALIGNMENT = 4  # RFC 4303 section 2.4: the ciphertext ends on a 4-byte boundary (GCM's block size is 1)
AES_KEY_LENS = (16, 24, 32)
MIN_ESP_LEN = ESP_HEADER_LEN + IV_LEN + TRAILER_LEN + ICV_LEN
MAX_SEQ = 0xFFFFFFFF  # 32-bit sequence numbers: the sender stops here (RFC 4303 section 3.3.3)
# IP protocol 59, "no next header": a dummy packet (traffic flow confidentiality) to be dropped.
NEXT_HEADER_DUMMY = 59

_HEADER = struct.Struct("!II")
_IV = struct.Struct("!Q")
# Padding bytes are 1, 2, 3 (RFC 4303 section 2.4); indexed by the pad length.
_PADDING = tuple(bytes(range(1, n + 1)) for n in range(256))


class EspError(OvsIpsecError):
    """A packet the codec refuses; `counter` names the drop counter it increments."""

    counter = "malformed"


class MalformedEsp(EspError):
    counter = "malformed"


class AuthenticationFailed(EspError):
    counter = "auth_failed"


class BadPadding(EspError):
    counter = "bad_padding"


@dataclass(frozen=True)
class AeadKey:
    """AES-GCM key material as `ip xfrm state ... aead 'rfc4106(gcm(aes))' 0x<key||salt> 128`.

    Never printed: repr hides both parts, so an accidental log line or traceback shows no secret.
    """

    key: bytes = field(repr=False)
    salt: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) not in AES_KEY_LENS or len(self.salt) != SALT_LEN:
            raise ValueError("AES-GCM needs a 16, 24 or 32-byte key and a 4-byte salt")

    @classmethod
    def from_material(cls, material: bytes) -> AeadKey:
        """key||salt, 20, 28 or 36 bytes, as the kernel and the ovs-dev `esp` series take it."""
        return cls(key=bytes(material[:-SALT_LEN]), salt=bytes(material[-SALT_LEN:]))

    @property
    def bits(self) -> int:
        return len(self.key) * 8


@dataclass(frozen=True)
class SaCipher:
    """One SA's SPI and its ready-to-use AES-GCM context (built once: keying costs per packet)."""

    spi: int
    key: AeadKey = field(repr=False)
    aead: AESGCM = field(repr=False, compare=False)
    header_prefix: bytes = field(repr=False, compare=False)  # the SPI, packed once

    @classmethod
    def create(cls, spi: int, key: AeadKey) -> SaCipher:
        if not 0 < spi <= 0xFFFFFFFF:
            raise ValueError("an SPI is a non-zero 32-bit number")
        return cls(spi=spi, key=key, aead=AESGCM(key.key), header_prefix=struct.pack("!I", spi))


@dataclass(frozen=True)
class Opened:
    """A packet that passed the integrity check."""

    seq: int
    next_header: int
    payload: bytes


def padding_len(payload_len: int) -> int:
    """Bytes of padding so that payload + padding + trailer ends on a 4-byte boundary."""
    return -(payload_len + TRAILER_LEN) % ALIGNMENT


def esp_overhead(payload_len: int) -> int:
    """What ESP adds to a payload of this length (header, IV, padding, trailer, ICV)."""
    return ESP_HEADER_LEN + IV_LEN + padding_len(payload_len) + TRAILER_LEN + ICV_LEN


def max_payload_len(budget: int) -> int:
    """The largest payload whose ESP form (SPI to ICV) fits in `budget` bytes (-1 if none does)."""
    room = budget - ESP_HEADER_LEN - IV_LEN - ICV_LEN
    if room < TRAILER_LEN:
        return -1
    return room - room % ALIGNMENT - TRAILER_LEN


def iv_for(seq: int) -> bytes:
    """The datapath's IV: the 64-bit sequence number (unique per SA as long as seq is)."""
    return _IV.pack(seq)


def seal(cipher: SaCipher, seq: int, iv: bytes, payload: bytes, next_header: int, seq_hi: int | None = None) -> bytes:
    """ESP header, IV, encrypted payload and trailer, ICV: everything after the IP header.

    `seq_hi`: the high 32 bits of an extended sequence number (RFC 4303 2.2.1); they are not
    sent, only authenticated (RFC 4106 section 5: AAD = SPI || seq high || seq low). The
    datapath does not use ESN; pcap-decrypt needs it for SAs that negotiated it.
    """
    if not 0 < seq <= MAX_SEQ:
        raise ValueError("sequence numbers run from 1 to 2^32-1")
    if len(iv) != IV_LEN:
        raise ValueError("the explicit IV is 8 bytes")
    header = cipher.header_prefix + seq.to_bytes(4, "big")
    aad = header if seq_hi is None else cipher.header_prefix + seq_hi.to_bytes(4, "big") + header[4:]
    pad = -(len(payload) + TRAILER_LEN) % ALIGNMENT
    plaintext = payload + _PADDING[pad] + bytes((pad, next_header))
    return header + iv + cipher.aead.encrypt(cipher.key.salt + iv, plaintext, aad)


def peek(packet: bytes) -> tuple[int, int]:
    """(SPI, sequence number) of an ESP packet, before anything is verified."""
    if len(packet) < MIN_ESP_LEN:
        raise MalformedEsp(f"an ESP packet has at least {MIN_ESP_LEN} bytes, this one {len(packet)}")
    return _HEADER.unpack_from(packet)


def open_esp(cipher: SaCipher, packet: bytes, seq_hi: int | None = None) -> Opened:
    """Verify and decrypt one ESP packet (SPI to ICV) of this SA; raise an EspError otherwise.
    `seq_hi`: see seal()."""
    spi, seq = peek(packet)
    if spi != cipher.spi:
        raise MalformedEsp(f"SPI 0x{spi:08x} is not this SA's 0x{cipher.spi:08x}")
    iv = packet[ESP_HEADER_LEN:ESP_HEADER_LEN + IV_LEN]
    aad = packet[:ESP_HEADER_LEN] if seq_hi is None else packet[:4] + seq_hi.to_bytes(4, "big") + packet[4:8]
    try:
        plaintext = cipher.aead.decrypt(cipher.key.salt + iv, packet[ESP_HEADER_LEN + IV_LEN:], aad)
    except InvalidTag:
        raise AuthenticationFailed(f"ICV check failed (SPI 0x{spi:08x}, seq {seq})") from None
    pad, next_header = plaintext[-2], plaintext[-1]
    end = len(plaintext) - TRAILER_LEN - pad
    if end < 0:
        raise BadPadding(f"pad length {pad} exceeds the payload (SPI 0x{spi:08x}, seq {seq})")
    # RFC 4303 section 2.4: the receiver SHOULD check the default padding 1, 2, 3, ...
    if plaintext[end:end + pad] != _PADDING[pad]:
        raise BadPadding(f"padding is not 1, 2, 3, ... (SPI 0x{spi:08x}, seq {seq})")
    return Opened(seq=seq, next_header=next_header, payload=plaintext[:end])


@dataclass(frozen=True)
class ReplayWindow:
    """RFC 4303 section 3.4.3: `top` is the highest authenticated sequence number; bit i of
    `bitmap` says whether top - i has been received. `size` 0 turns the check off."""

    size: int = 64
    top: int = 0
    bitmap: int = 0

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("a replay window has a non-negative size")

    def check(self, seq: int) -> str | None:
        """None when seq may be accepted, else the drop counter's name ("replay" or "too_old")."""
        if seq == 0:
            return "replay"  # never sent (the first packet is 1): only a forgery has it
        if self.size == 0 or seq > self.top:
            return None
        offset = self.top - seq
        if offset >= self.size:
            return "too_old"
        return "replay" if (self.bitmap >> offset) & 1 else None

    def accept(self, seq: int) -> ReplayWindow:
        """The window after seq passed its integrity check (check() must have allowed it)."""
        if self.size == 0:
            return ReplayWindow(0, max(self.top, seq), 0)
        mask = (1 << self.size) - 1
        if seq > self.top:
            return ReplayWindow(self.size, seq, ((self.bitmap << (seq - self.top)) | 1) & mask)
        return ReplayWindow(self.size, self.top, self.bitmap | (1 << (self.top - seq)))
