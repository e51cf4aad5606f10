"""The kernel's IPsec policies and SAs, read over an XFRM netlink socket (no `ip` to screen-scrape).

`parse_policies` and `parse_states` are pure: netlink dump bytes in, frozen values out. Key
material never leaves this module: of an algorithm attribute only the name is read, the key bytes
that follow it are skipped unread. `XfrmReader` is the adapter: one dump request per call, in the
network namespace of the calling process.

Layouts (include/uapi/linux/xfrm.h, x86_64): xfrm_selector 56 bytes, xfrm_userpolicy_info 168,
xfrm_usersa_info 224; attributes follow each, 4-byte aligned.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import OvsIpsecError

NETLINK_XFRM = 6
XFRM_MSG_NEWSA, XFRM_MSG_GETSA, XFRM_MSG_NEWPOLICY, XFRM_MSG_GETPOLICY = 16, 18, 19, 21
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT, XFRMA_ENCAP, XFRMA_TMPL = 1, 2, 4, 5
XFRMA_ALG_AEAD, XFRMA_ALG_AUTH_TRUNC, XFRMA_MARK, XFRMA_IF_ID = 18, 20, 21, 31
ALGORITHM_NAME_LENGTH = 64
_SELECTOR = struct.Struct("=16s16sHHHHHBBBxxxiI")  # 56 bytes
_POLICY_TAIL = struct.Struct("=IIBBBB")  # priority, index, dir, action, flags, share at offset 152
_POLICY_INFO_SIZE = 168
_SA_ID = struct.Struct("=16sIB3x")  # daddr, spi (big-endian on the wire), proto, at offset 56
_SA_INFO_SIZE = 224
DIRECTIONS = {0: "in", 1: "out", 2: "fwd"}
ACTIONS = {0: "allow", 1: "block"}
MODES = {0: "transport", 1: "tunnel", 2: "ro", 3: "in_trigger", 4: "beet"}
PROTOCOLS = {6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah", 108: "comp", 253: "253"}


@dataclass(frozen=True)
class Selector:
    src: str  # network, e.g. "10.0.0.1/32"
    dst: str
    protocol: str | None
    sport: int | None
    dport: int | None

    def __str__(self) -> str:
        text = f"{self.src} -> {self.dst}"
        if self.protocol:
            text += f" {self.protocol}"
        if self.sport is not None:
            text += f" sport {self.sport}"
        if self.dport is not None:
            text += f" dport {self.dport}"
        return text


@dataclass(frozen=True)
class KernelPolicy:
    selector: Selector
    direction: str  # in | out | fwd | socket
    action: str  # allow | block
    priority: int
    index: int
    mark: tuple[int, int] | None  # (value, mask)
    templates: int  # how many IPsec transforms the policy requires (0: none, e.g. block or trap-less)

    def as_json(self) -> dict:
        return {"dir": self.direction, "selector": str(self.selector), "action": self.action,
                "priority": self.priority, "index": self.index, "templates": self.templates,
                "mark": None if self.mark is None else f"{self.mark[0]:#x}/{self.mark[1]:#x}"}


@dataclass(frozen=True)
class KernelSA:
    src: str
    dst: str
    protocol: str  # esp | ah | comp
    spi: int
    mode: str
    reqid: int
    selector: Selector
    algorithms: tuple[str, ...]  # names only, e.g. "rfc4106(gcm(aes))"; never a key
    encapsulated: bool  # UDP-encapsulated (NAT traversal)
    bytes: int
    packets: int
    replay_window: int

    def as_json(self) -> dict:
        return {"src": self.src, "dst": self.dst, "proto": self.protocol, "spi": f"{self.spi:#010x}",
                "mode": self.mode, "reqid": self.reqid, "selector": str(self.selector),
                "algorithms": list(self.algorithms), "udp_encap": self.encapsulated, "bytes": self.bytes,
                "packets": self.packets, "replay_window": self.replay_window}


def parse_policies(dump: bytes) -> tuple[KernelPolicy, ...]:
    policies = []
    for kind, body in _messages(dump):
        if kind != XFRM_MSG_NEWPOLICY or len(body) < _POLICY_INFO_SIZE:
            continue
        selector = _selector(body)
        priority, index, direction, action, _flags, _share = _POLICY_TAIL.unpack_from(body, 152)
        mark, templates = None, 0
        for attr_type, value in _attributes(body[_POLICY_INFO_SIZE:]):
            if attr_type == XFRMA_MARK and len(value) >= 8:
                mark = struct.unpack_from("=II", value)
            elif attr_type == XFRMA_TMPL:
                templates = len(value) // 64  # struct xfrm_user_tmpl
        policies.append(KernelPolicy(selector, DIRECTIONS.get(direction, "socket"), ACTIONS.get(action, "?"),
                                     priority, index, mark, templates))
    return tuple(policies)


def parse_states(dump: bytes) -> tuple[KernelSA, ...]:
    states = []
    for kind, body in _messages(dump):
        if kind != XFRM_MSG_NEWSA or len(body) < _SA_INFO_SIZE:
            continue
        selector = _selector(body)
        daddr, spi, proto = _SA_ID.unpack_from(body, 56)
        saddr = body[80:96]
        current_bytes, current_packets = struct.unpack_from("=QQ", body, 160)
        replay_window, = struct.unpack_from("=I", body, 192)
        _seq, reqid, family, mode = struct.unpack_from("=IIHB", body, 204)
        algorithms, encapsulated = [], False
        for attr_type, value in _attributes(body[_SA_INFO_SIZE:]):
            if attr_type in (XFRMA_ALG_AEAD, XFRMA_ALG_CRYPT, XFRMA_ALG_AUTH, XFRMA_ALG_AUTH_TRUNC):
                # struct xfrm_algo*: the name, then lengths and the key. Only the name is read.
                algorithms.append(value[:ALGORITHM_NAME_LENGTH].split(b"\0", 1)[0].decode("ascii", "replace"))
            elif attr_type == XFRMA_ENCAP:
                encapsulated = True
        states.append(KernelSA(_address(saddr, family), _address(daddr, family), PROTOCOLS.get(proto, str(proto)),
                               socket.ntohl(spi), MODES.get(mode, str(mode)), reqid, selector, tuple(algorithms),
                               encapsulated, current_bytes, current_packets, replay_window))
    return tuple(states)


class XfrmReader:
    """Dumps the SPD and the SAD of the caller's network namespace."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = timeout

    def policies(self) -> tuple[KernelPolicy, ...]:
        return parse_policies(self._dump(XFRM_MSG_GETPOLICY))

    def states(self) -> tuple[KernelSA, ...]:
        return parse_states(self._dump(XFRM_MSG_GETSA))

    def _dump(self, request: int) -> bytes:
        try:
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM) as sock:
                sock.settimeout(self._timeout)
                sock.bind((0, 0))
                payload = struct.pack("=Bxxx", socket.AF_UNSPEC)  # struct rtgenmsg, padded
                sock.send(struct.pack("=IHHII", 16 + len(payload), request, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                          + payload)
                chunks = []
                while True:
                    chunk = sock.recv(1 << 20)
                    chunks.append(chunk)
                    if any(kind in (NLMSG_DONE, NLMSG_ERROR) for kind, _body in _messages(chunk)):
                        return b"".join(chunks)
        except OSError as exc:
            what = "policies" if request == XFRM_MSG_GETPOLICY else "SAs"
            raise OvsIpsecError(f"cannot read the kernel's XFRM {what}: {exc.strerror or exc}") from exc


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > len(data):
            return
        yield kind, data[offset + 16:offset + length]
        offset += (length + 3) & ~3


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(data):
        length, attr_type = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            return
        yield attr_type & 0x3FFF, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


def _selector(body: bytes) -> Selector:
    daddr, saddr, dport, dport_mask, sport, sport_mask, family, prefix_d, prefix_s, proto, _ifindex, _user = \
        _SELECTOR.unpack_from(body, 0)
    return Selector(f"{_address(saddr, family)}/{prefix_s}", f"{_address(daddr, family)}/{prefix_d}",
                    PROTOCOLS.get(proto, str(proto)) if proto else None,
                    socket.ntohs(sport) if sport_mask else None, socket.ntohs(dport) if dport_mask else None)


def _address(raw: bytes, family: int) -> str:
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return str(ipaddress.IPv4Address(raw[:4]))
