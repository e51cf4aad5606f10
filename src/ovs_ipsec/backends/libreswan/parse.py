"""pluto's text output -> observed values. Pure: text in, values out.

There is no structured interface to pluto (varlink is only planned), so this reads the two
parts of `whack --status` that OVS and other tools have relied on for years and that survived
the 4.x -> 5.x changes:

* connection lines, `"<name>": <addresses>...` (every connection, one block each);
* state lines, `#<serial>: "<name>":<port> <STATE> (<description>); ...; <parent>; ...`.

What did change is tolerated: LibreSwan 4 prefixes each line with a three-digit code ("000 "),
5 does not; 4 names states `STATE_V2_ESTABLISHED_IKE_SA`, 5.0-5.3 `ESTABLISHED_IKE_SA`, later
versions print only the description (`established IKE SA`); a Child SA names its IKE SA as
`isakmp#1` (early 4.x) or `IKE SA #1` (4.10 and 5, as captured in the lab from Debian 12's 4.10 and
Debian 13's 5.2). Traffic lines (`esp.<spi>@... Traffic:`) are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ...model import ObservedSA, ObservedState
from .render import ANCHOR, split_name

INCOMPLETE = "(anchor or file missing)"  # a pseudo-child: forces a reload of the peering

_CODE = re.compile(r"^\d{3} ")
NICKNAME = re.compile(r"ovsipsec-(?:key|peer|ca)-[0-9a-f]{16}")
_VERSION = re.compile(r"Libreswan\s+U?v?(\d+)\.(\d+)")
_CONN_LINE = re.compile(r'^"(?P<name>[^"]+)"(?:\[\d+\])?:\s')
_STATE_LINE = re.compile(r'^#(?P<serial>\d+): "(?P<name>[^"]+)"(?:\[\d+\])?(?P<rest>.*)$')
_TRAFFIC = re.compile(r"\besp[.:][0-9a-f]+@|\bTraffic:")
_IKE_UP = re.compile(r"ESTABLISHED_IKE_SA|established IKE SA|STATE_(?:MAIN|AGGR)_[IR][34]\b")
_CHILD_UP = re.compile(r"ESTABLISHED_CHILD_SA|established Child SA|IPsec SA established|STATE_QUICK_[IR]2\b")
_PARENT = re.compile(r"(?:isakmp#|IKE SA #)(\d+)")
_STATE_NAME = re.compile(r"\b((?:STATE_)?[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\b")
# "no connection named" (4.x) became "no connection or alias named" in 5.x (5.2, captured).
_PROBLEM = re.compile(r"did not load|failed to add|not found|no connection (?:or alias )?named|cannot|ERROR|"
                      r"FATAL|unknown|invalid|[Ff]ailed", re.IGNORECASE)


@dataclass(frozen=True)
class PlutoState:
    serial: int
    conn: str  # pluto connection name
    child: bool  # a Child SA (IPsec SA); False: an IKE SA
    established: bool
    parent: int | None = None  # a Child SA's IKE SA
    deleting: bool = False


def version(text: str) -> tuple[int, int] | None:
    """(major, minor) from `ipsec --version` ("Libreswan 4.10", "Linux Libreswan 3.32 (netkey) ...")."""
    match = _VERSION.search(text)
    return (int(match[1]), int(match[2])) if match else None


def lines(text: str) -> Iterable[str]:
    # Line by line, never splitlines(): `whack --status` at N = 1000 is ~8 MB, whose list of lines
    # would add ~10 MB to the monitor's peak (the allocator keeps that high-water mark as RSS).
    start, size = 0, len(text)
    while start < size:
        end = text.find("\n", start)
        if end < 0:
            end = size
        yield _CODE.sub("", text[start:end], count=1).strip()
        start = end + 1


def loaded_conns(status: str) -> set[str]:
    """Every connection pluto holds, from the connection list of `whack --status`."""
    return {m["name"] for line in lines(status) if (m := _CONN_LINE.match(line))}


def states(text: str) -> list[PlutoState]:
    """IKE and Child SA states from `whack --status` or `whack --showstates`."""
    return [state for line in lines(text) if (state := _state(line))]


def status_lines(raw_lines: Iterable[str]) -> tuple[set[str], list[PlutoState]]:
    """(connections, states) of `whack --status`, in one pass over its lines (read from a file:
    the whole text is ~8 MB at N = 1000)."""
    conns, found = set(), []
    for raw in raw_lines:
        line = _CODE.sub("", raw, count=1).strip()
        if match := _CONN_LINE.match(line):
            conns.add(match["name"])
        elif state := _state(line):
            found.append(state)
    return conns, found


def _state(line: str) -> PlutoState | None:
    match = _STATE_LINE.match(line)
    if not match or _TRAFFIC.search(match["rest"]):
        return None
    rest = match["rest"]
    parent = _PARENT.search(rest)
    name = _STATE_NAME.search(rest)
    child_up = bool(_CHILD_UP.search(rest))
    child = child_up or parent is not None or bool(name and "CHILD" in name[1])
    return PlutoState(serial=int(match["serial"]), conn=match["name"], child=child,
                      established=child_up if child else bool(_IKE_UP.search(rest)),
                      parent=int(parent[1]) if parent else None,
                      deleting="DELET" in rest.upper().split(";")[0])


def observed(status: str, conn_files: Collection[str], secret_files: Collection[str]) -> ObservedState:
    """Our peerings, secrets and SAs from `whack --status` and the names of our files."""
    return observed_from(loaded_conns(status), states(status), conn_files, secret_files)


def observed_from(loaded: Collection[str], found: Iterable[PlutoState], conn_files: Collection[str],
                  secret_files: Collection[str]) -> ObservedState:
    """Our peerings, secrets and SAs.

    A peering is observed when pluto holds any of its connections or its file exists; its
    children are the pluto connections present. Without its anchor or its file it is reported
    with the INCOMPLETE pseudo-child, so the planner reloads it (or removes it if unwanted).
    """
    children: dict[str, set[str]] = {}
    anchored: set[str] = set()
    for name in loaded:
        parts = split_name(name)
        if parts is None:
            continue
        peering, child = parts
        children.setdefault(peering, set())
        if child == ANCHOR:
            anchored.add(peering)
        else:
            children[peering].add(name)
    conns = {}
    for peering in set(children) | set(conn_files):
        missing = peering not in anchored or peering not in conn_files
        conns[peering] = frozenset(children.get(peering, set()) | ({INCOMPLETE} if missing else set()))
    return ObservedState(conns=conns, shared_secrets=frozenset(secret_files), sas=ike_sas(found))


def ike_sas(found: Iterable[PlutoState]) -> dict[str, tuple[ObservedSA, ...]]:
    """Our IKE SAs per peering, each with the children (pluto connection names) installed on it."""
    found = list(found)
    installed: dict[int, set[str]] = {}
    for state in found:
        parts = split_name(state.conn)
        if state.child and state.established and state.parent is not None and parts and parts[1] != ANCHOR:
            installed.setdefault(state.parent, set()).add(state.conn)
    by_peering: dict[str, list[ObservedSA]] = {}
    for state in found:
        parts = split_name(state.conn)
        if state.child or parts is None:
            continue
        condition = "DELETING" if state.deleting else "ESTABLISHED" if state.established else "CONNECTING"
        by_peering.setdefault(parts[0], []).append(ObservedSA(
            conn_name=parts[0], unique_id=f"#{state.serial}", state=condition, established_seconds=None,
            installed_children=tuple(sorted(installed.get(state.serial, ())))))
    return {peering: tuple(sorted(sas, key=lambda sa: sa.unique_id)) for peering, sas in by_peering.items()}


def ike_owners(found: Iterable[PlutoState]) -> set[str]:
    """The pluto connections that own an IKE SA (deleting one of them takes the IKE SA down)."""
    return {state.conn for state in found if not state.child}


def fingerprint(found: Iterable[PlutoState]) -> dict[str, frozenset]:
    """Per peering, what an SA event would have told: which states exist and which are up."""
    prints: dict[str, set] = {}
    for state in found:
        parts = split_name(state.conn)
        if parts:
            prints.setdefault(parts[0], set()).add((state.serial, state.conn, state.child, state.established))
    return {peering: frozenset(items) for peering, items in prints.items()}


def problem(stdout: str, stderr: str, returncode: int) -> str | None:
    """Why an addconn/whack call failed, or None.

    Neither tool's exit status is enough: LibreSwan 4's addconn exits 0 when a connection "did
    not load properly", and whack exits 0 when the connection it was asked to initiate is
    unknown (5.2 exits 255 and 21 there, with `ERROR: ipsec addconn: ...` and `no connection or
    alias named "x"`, and no codes). LibreSwan 4 marks errors with codes 020-099 (e.g. "021 no
    connection named"); 010 is RC_RETRANSMISSION, "failure, but not definitive": an asynchronous
    initiate queued on an IKE SA may echo that SA's retransmissions, and the initiate still goes
    ahead.
    """
    bad = []
    for raw in (stdout + "\n" + stderr).splitlines():
        line = raw.strip()
        code = raw[:3]
        if code.isdigit() and raw[3:4] == " ":
            if 20 <= int(code) < 100 or "ERROR" in line:
                bad.append(line[4:])
        elif line and _PROBLEM.search(line):
            bad.append(line)
    if returncode != 0 and not bad:
        bad.append(f"exit status {returncode}")
    return "; ".join(dict.fromkeys(bad)) or None


def unreachable(stdout: str, stderr: str) -> bool:
    """whack could not reach pluto at all (as opposed to pluto refusing a request)."""
    text = stdout + stderr
    return "is not running" in text or "Connection refused" in text or "No such file" in text


def nss_nicknames(certutil_list: str) -> set[str]:
    """Our nicknames in `certutil -L` (the nickname is all but the trust column; ours have no spaces)."""
    names = set()
    for line in certutil_list.splitlines():
        token = line.split(" ", 1)[0]
        if NICKNAME.fullmatch(token):
            names.add(token)
    return names


def pem_blocks(text: str) -> list[str]:
    """The PEM certificates in `certutil -L -a` output, normalised to their base64 body."""
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    return ["".join(block.split()) for block in blocks]
