"""One parser per kind of OVSDB value: the whole string matches an explicit allow-list, or it is refused.

Every pattern is applied with `re.fullmatch` and spelled with ASCII classes (`[0-9]`, never `\\d`,
which also matches "²" and other Unicode digits; never `$`, which also matches before a final
newline). A parser returns a typed value (an int, a canonical address, a tuple of tokens), so
nothing downstream ever sees the operator's raw text again.
"""

from __future__ import annotations

import ipaddress
import re

from ..text import shown

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:@+-]{1,200}")
NAME_RULE = "1-200 characters of letters, digits and _ . : @ + -"
# The characters of an address literal; scope ids ("fe80::1%eth0") are refused before parsing,
# because ipaddress accepts any character after "%", newline and quotes included.
_ADDRESS_CHARACTERS = re.compile(r"[0-9A-Fa-f.:]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")
_NUMBER = re.compile(r"[0-9]{1,9}")
_DURATION = re.compile(r"(?P<number>[0-9]{1,9})(?P<unit>[smhd]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Algorithm names of strongSwan and LibreSwan proposals (each daemon still refuses the other's
# dialect, with a reason in status). Not here, so never accepted: `null` encryption, integrity-only
# GMAC, MD5, DES, and DH groups below 2048 bits.
_ALGORITHM = re.compile(
    r"(?:aes|camellia)(?:128|192|256)?(?:gcm|ccm|ctr|cbc)?(?:8|12|16|64|96|128)?"
    r"|(?:aes|camellia)_(?:gcm|ccm|ctr|cbc)(?:_?(?:a|b|c|8|12|16))?(?:128|192|256)?"
    r"|aes(?:128|192|256)?_(?:gcm|ccm)(?:_?(?:8|12|16))?|chacha20_?poly1305|3des"
    r"|sha1|sha(?:256|384|512)|sha2(?:_(?:256|384|512))?|sha256_96|aes_?xcbc|aes_?cmac"
    r"|prf(?:sha1|sha256|sha384|sha512|sha2_(?:256|384|512)|aesxcbc|aes_xcbc|aescmac)"
    r"|modp(?:2048|3072|4096|6144|8192)(?:s256)?|ecp(?:256|384|521)(?:bp)?|curve(?:25519|448)|x(?:25519|448)"
    r"|dh(?:1[4-9]|2[01]|3[12])|esn|noesn|none")
_TRUE, _FALSE = frozenset({"yes", "true"}), frozenset({"no", "false"})
# Absolute paths of printable ASCII without "..": they are shown in status and logs, and opened
# as root, so nothing relative or surprising gets through.
_PATH = re.compile(r"/[\x21-\x7e]{0,4095}")
MAX_PSK_BYTES = 2048


class Reject(Exception):
    """Raised inside one tunnel's validation; caught per tunnel so the others are unaffected."""


def name(value: str, what: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise Reject(f"{what} {shown(value)} must be {NAME_RULE}")
    return value


def address(value: str, key: str) -> str:
    """A literal IPv4 or IPv6 unicast address in canonical form; no scope id, no name, not "any"."""
    if value == "flow":
        raise Reject(f"'{key}=flow' cannot be encrypted: IPsec needs a fixed peer address")
    if not _ADDRESS_CHARACTERS.fullmatch(value):
        raise Reject(f"'{key}' {shown(value)} is not an IP address (a literal IPv4 or IPv6 address, "
                     "without a scope id)")
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        raise Reject(f"'{key}' {shown(value)} is not an IP address") from None
    if parsed.is_unspecified or parsed.is_multicast:
        # An IKE daemon reads the unspecified address as "any peer".
        raise Reject(f"'{key}' {value} is not a unicast address")
    return str(parsed)


def port(value: str, key: str) -> int:
    if not _PORT.fullmatch(value) or not 0 < int(value) < 65536:
        raise Reject(f"'{key}' {shown(value)} is not a port number (1-65535)")
    return int(value)


def number(value: str, key: str, low: int = 0, high: int = 999_999_999) -> int:
    if not _NUMBER.fullmatch(value) or not low <= int(value) <= high:
        raise Reject(f"option '{key}' has an invalid value {shown(value)} (a number from {low} to {high})")
    return int(value)


def duration(value: str, key: str) -> int:
    """Seconds, from `30`, `30s`, `5m`, `8h` or `1d` (both IKE daemons' syntax)."""
    match = _DURATION.fullmatch(value)
    if not match:
        raise Reject(f"option '{key}' has an invalid value {shown(value)} (a duration such as 30s, 5m, 8h or 1d)")
    return int(match["number"]) * _DURATION_UNITS[match["unit"]]


def boolean(value: str, key: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Reject(f"option '{key}' has an invalid value {shown(value)} (yes, no, true or false)")


def choice(value: str, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise Reject(f"option '{key}' has an invalid value {shown(value)} (one of: {', '.join(choices)})")
    return value


def proposals(value: str, key: str) -> tuple[str, ...]:
    """Comma-separated proposals, each algorithm names joined by `-` (and `;` before a LibreSwan DH
    group), optionally ending in `!`; every name from the allow-list above."""
    items = tuple(item.strip(" ") for item in value.split(","))
    for item in items:
        names = re.split(r"[-;]", item.removesuffix("!")) if item else [""]
        unknown = [name for name in names if not _ALGORITHM.fullmatch(name.lower())]
        if unknown:
            raise Reject(f"option '{key}' has an invalid value {shown(value)}: {shown(unknown[0])} is not an "
                         "algorithm name (comma-separated proposals such as aes256gcm16-sha256-modp2048)")
    return items


def path(value: str, key: str) -> str:
    if not _PATH.fullmatch(value) or "/../" in value + "/":
        raise Reject(f"'{key}' {shown(value)} is not an absolute path of printable ASCII characters")
    return value


def psk(value: str) -> str:
    """Any non-empty pre-shared key both IKE daemons can hold: VICI carries bytes, and LibreSwan's
    secrets file gets it base64-encoded, so quotes, backslashes, `#` and UTF-8 are all fine."""
    if not value:
        raise Reject("'psk' is empty")
    if "\x00" in value:
        raise Reject("'psk' contains a NUL character, which pluto cannot hold")
    if len(value.encode()) > MAX_PSK_BYTES:
        raise Reject(f"'psk' is longer than {MAX_PSK_BYTES} bytes")
    return value
