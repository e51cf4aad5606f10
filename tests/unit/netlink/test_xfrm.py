"""XFRM netlink dumps -> values; the key material of an SA is never read."""

from __future__ import annotations

import json
import socket
import struct

from ovs_ipsec.netlink import xfrm

KEY = bytes(range(1, 21))  # 16-byte AES key + 4-byte salt, as rfc4106 wants


def selector(src: str, dst: str, proto: int, dport: int = 0, sport: int = 0) -> bytes:
    return struct.pack("=16s16sHHHHHBBBxxxiI", socket.inet_aton(dst).ljust(16, b"\0"),
                       socket.inet_aton(src).ljust(16, b"\0"), socket.htons(dport), 0xFFFF if dport else 0,
                       socket.htons(sport), 0xFFFF if sport else 0, socket.AF_INET, 32, 32, proto, 0, 0)


def attribute(kind: int, value: bytes) -> bytes:
    padded = value + b"\0" * (-len(value) % 4)
    return struct.pack("=HH", 4 + len(value), kind) + padded


def message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body


def sa_message() -> bytes:
    body = bytearray(224)
    body[0:56] = selector("10.0.0.1", "10.0.0.2", 17, dport=6081)
    body[56:80] = struct.pack("=16sIB3x", socket.inet_aton("10.0.0.2").ljust(16, b"\0"), socket.htonl(0xC1C2C3C4), 50)
    body[80:96] = socket.inet_aton("10.0.0.1").ljust(16, b"\0")
    body[160:176] = struct.pack("=QQ", 1500, 3)
    body[192:196] = struct.pack("=I", 32)
    body[204:215] = struct.pack("=IIHB", 0, 7, socket.AF_INET, 0)
    aead = b"rfc4106(gcm(aes))".ljust(64, b"\0") + struct.pack("=II", len(KEY) * 8, 128) + KEY
    return message(xfrm.XFRM_MSG_NEWSA, bytes(body) + attribute(xfrm.XFRMA_ALG_AEAD, aead))


def test_an_sa_is_read_without_its_key():
    dump = sa_message() + message(xfrm.NLMSG_DONE, b"\0" * 4)
    (state,) = xfrm.parse_states(dump)
    assert (state.src, state.dst, state.protocol, state.spi, state.mode, state.reqid) == (
        "10.0.0.1", "10.0.0.2", "esp", 0xC1C2C3C4, "transport", 7)
    assert str(state.selector) == "10.0.0.1/32 -> 10.0.0.2/32 udp dport 6081"
    assert state.algorithms == ("rfc4106(gcm(aes))",) and (state.bytes, state.packets) == (1500, 3)
    shown = repr(state) + json.dumps(state.as_json())
    assert KEY.hex() not in shown and "0102030405" not in shown


def test_a_policy_with_a_mark_and_a_template():
    body = bytearray(168)
    body[0:56] = selector("10.0.0.1", "10.0.0.2", 47)
    body[152:164] = struct.pack("=IIBBBB", 1000, 9, 1, 0, 0, 0)
    dump = message(xfrm.XFRM_MSG_NEWPOLICY, bytes(body) + attribute(xfrm.XFRMA_MARK, struct.pack("=II", 1, 1))
                   + attribute(xfrm.XFRMA_TMPL, b"\0" * 64))
    (policy,) = xfrm.parse_policies(dump)
    assert (policy.direction, policy.action, policy.priority, policy.index, policy.mark, policy.templates) == (
        "out", "allow", 1000, 9, (1, 1), 1)
    assert str(policy.selector) == "10.0.0.1/32 -> 10.0.0.2/32 gre"


def test_truncated_or_foreign_messages_are_skipped():
    assert xfrm.parse_states(sa_message()[:100]) == ()
    assert xfrm.parse_policies(message(xfrm.XFRM_MSG_NEWSA, b"\0" * 300)) == ()
