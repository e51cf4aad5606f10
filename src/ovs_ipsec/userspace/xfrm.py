"""SA keys for pcap-decrypt: `SPI:KEY` arguments, `SPI KEY` lines, or `ip xfrm state` output. Pure.

`ip xfrm state` (root) prints each kernel SA with its key:

    src 10.0.0.1 dst 10.0.0.2
        proto esp spi 0x00001001 reqid 0 mode transport
        replay-window 0
        aead rfc4106(gcm(aes)) 0x<key||salt> 128
        sel src 10.0.0.1/32 dst 10.0.0.2/32 proto udp dport 4789

so a capture of kernel ESP (the lab's kernel hosts, or SAs charon negotiated) decrypts with the
same tool as ours. Only AES-GCM (rfc4106) SAs are usable; others are listed as skipped.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from ..errors import OvsIpsecError
from .esp import AeadKey

_SPI = r"(?:0x[0-9a-fA-F]{1,8}|[0-9]{1,10})"
_KEY = r"0x(?:[0-9a-fA-F]{40}|[0-9a-fA-F]{56}|[0-9a-fA-F]{72})"
_ARGUMENT = re.compile(rf"(?P<spi>{_SPI}):(?P<key>{_KEY})")
_LINE = re.compile(rf"(?P<spi>{_SPI})\s+(?P<key>{_KEY})")
_STATE_HEAD = re.compile(r"src (?P<src>[0-9a-fA-F:.]{2,45}) dst (?P<dst>[0-9a-fA-F:.]{2,45})")
# `ip -s` prints the SPI and reqid again in parentheses: 0x00001001(4097) reqid 1(0x00000001).
_STATE_PROTO = re.compile(r"proto (?P<proto>\w+) spi (?P<spi>0x[0-9a-fA-F]{1,8})(?:\(\d+\))?"
                          r"(?: reqid \d+(?:\(0x[0-9a-fA-F]+\))?)?(?: mode (?P<mode>[\w-]+))?.*")
# `ip -s` adds the key's size in bits after it.
_STATE_AEAD = re.compile(rf"aead rfc4106\(gcm\(aes\)\) (?P<key>{_KEY})(?: \(\d+ bits\))? 128")
_STATE_SEL = re.compile(r"sel src \S+ dst \S+(?: proto (?P<proto>\w+))?(?: sport (?P<sport>\d+))?"
                        r"(?: dport (?P<dport>\d+))?.*")
_STATE_MARK = re.compile(r"mark (?P<mark>0x[0-9a-fA-F]{1,8}/0x[0-9a-fA-F]{1,8})")
_STATE_ADDED = re.compile(r"add (?P<added>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?: use .*)?")
_STATE_FLAGS = re.compile(r"replay-window \d+.*?\bflag\b(?P<flags>[^(]*).*")
_PROTOCOLS = {"udp": 17, "gre": 47, "tcp": 6}


class SaSpecError(OvsIpsecError):
    """An SA given to pcap-decrypt is malformed (the message never repeats a key)."""


@dataclass(frozen=True)
class KnownSa:
    spi: int
    key: AeadKey = field(repr=False)
    src: str | None = None
    dst: str | None = None
    mode: str | None = None
    # From `ip xfrm state` only: the SA's selector (set_proto_port_transport_sa), its mark, and
    # when it was added (`ip -s`), which tells the newest SA of a rekeyed pair.
    sel_proto: int | None = None
    sel_dport: int | None = None
    mark: str | None = None
    added: str | None = None
    esn: bool = False  # extended sequence numbers (`flag esn`): the AAD carries the high 32 bits


def _spi(text: str) -> int:
    spi = int(text, 0)
    if not 0 < spi <= 0xFFFFFFFF:
        raise SaSpecError("an SPI is a non-zero 32-bit number")
    return spi


def _key(text: str) -> AeadKey:
    return AeadKey.from_material(bytes.fromhex(text[2:]))


def parse_sa_argument(value: str) -> KnownSa:
    match = _ARGUMENT.fullmatch(value.strip())
    if not match:
        raise SaSpecError("--sa takes SPI:KEY, SPI decimal or 0x-hex, KEY 0x and 40, 56 or 72 hex digits "
                          "(AES-128/192/256 key and 4-byte salt)")
    return KnownSa(_spi(match["spi"]), _key(match["key"]))


def parse_sa_text(text: str) -> list[KnownSa]:
    """`SPI KEY` lines (blank lines and # comments ignored), or `ip xfrm state` output."""
    lines = [line.strip() for line in text.splitlines()]
    if any(_STATE_HEAD.fullmatch(line) for line in lines):
        return parse_xfrm_state(text)
    sas = []
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if not match:
            raise SaSpecError(f"line {number}: expected 'SPI KEY' (key never shown here)")
        sas.append(KnownSa(_spi(match["spi"]), _key(match["key"])))
    return sas


def parse_xfrm_state(text: str) -> list[KnownSa]:
    """Every ESP SA with an rfc4106(gcm(aes)) key in `ip [-s] xfrm state` output."""
    sas = []
    for block in _blocks(text):
        head = _STATE_HEAD.fullmatch(block[0])
        if head is None:
            continue
        fields: dict = {}
        for line in block[1:]:
            for name, pattern in (("proto", _STATE_PROTO), ("aead", _STATE_AEAD), ("sel", _STATE_SEL),
                                  ("mark", _STATE_MARK), ("added", _STATE_ADDED), ("flags", _STATE_FLAGS)):
                if name not in fields and (match := pattern.fullmatch(line)):
                    fields[name] = match
                    break
        proto, aead, sel = fields.get("proto"), fields.get("aead"), fields.get("sel")
        if proto is None or proto["proto"] != "esp" or aead is None:
            continue
        sas.append(KnownSa(
            _spi(proto["spi"]), _key(aead["key"]), _address(head["src"]), _address(head["dst"]), proto["mode"],
            sel_proto=_PROTOCOLS.get(sel["proto"]) if sel and sel["proto"] else None,
            sel_dport=int(sel["dport"]) if sel and sel["dport"] else None,
            mark=fields["mark"]["mark"] if "mark" in fields else None,
            added=fields["added"]["added"] if "added" in fields else None,
            esn="flags" in fields and "esn" in fields["flags"]["flags"].split()))
    return sas


def _blocks(text: str) -> list[list[str]]:
    """One list of stripped lines per SA: each starts with its `src A dst B` line."""
    blocks: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if _STATE_HEAD.fullmatch(line):
            blocks.append([line])
        elif blocks and line:
            blocks[-1].append(line)
    return blocks


def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
