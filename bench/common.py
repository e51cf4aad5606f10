"""What every benchmark cell shares: the OVSDB writer, the kernel SPD counter, pluto's connection
count, process meters, the idle detector and small VICI and whack helpers.

Everything here observes from outside: nothing is injected into the daemons being measured.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testsupport.procs import live_children

HZ = os.sysconf("SC_CLK_TCK")
PSK = "swordfish"
BRIDGE = "br-ipsec"  # created by testsupport.ovsdb.Ovsdb.start


def log(*parts) -> None:
    print(time.strftime("%T"), *parts, flush=True)


# -- OVSDB: one JSON-RPC transaction, timed at the reply (the commit) ------------------------------

class Ovsdb:
    """A raw JSON-RPC client: one `transact` per call, so N tunnels really are one transaction and
    the commit time is the reply time, without ovs-vsctl's own start-up and full-table fetch."""

    def __init__(self, sock_path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(600)
        self._sock.connect(sock_path)
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        self._id = 0

    def close(self) -> None:
        self._sock.close()

    def transact(self, *ops: dict) -> tuple[list, float, float]:
        """Run ops in one transaction; return (results, time sent, time the commit was confirmed)."""
        self._id += 1
        request = json.dumps({"method": "transact", "params": ["Open_vSwitch", *ops], "id": self._id})
        sent = time.time()
        self._sock.sendall(request.encode())
        while True:
            message = self._read()
            if message.get("method") == "echo":
                self._sock.sendall(json.dumps({"result": message["params"], "id": message["id"]}).encode())
                continue
            if message.get("id") == self._id:
                break
        committed = time.time()
        if message.get("error"):
            raise RuntimeError(f"OVSDB transaction failed: {message['error']}")
        errors = [r for r in message["result"] if isinstance(r, dict) and "error" in r]
        if errors:
            raise RuntimeError(f"OVSDB transaction failed: {errors[0]}")
        return message["result"], sent, committed

    def _read(self) -> dict:
        while True:
            stripped = self._buffer.lstrip()
            if stripped:
                try:
                    message, end = self._decoder.raw_decode(stripped)
                    self._buffer = stripped[end:]
                    return message
                except ValueError:
                    pass
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("ovsdb-server closed the connection")
            self._buffer += chunk.decode()

    def add_tunnels(self, tunnels: list[tuple[str, str, str]],
                    extra_options: tuple[tuple[str, str], ...] = ()) -> tuple[float, float]:
        """(name, local_ip, remote_ip) Geneve PSK tunnels, exactly the rows `ovs-vsctl add-port ...
        -- set interface NAME type=geneve options:local_ip=.. options:remote_ip=.. options:psk=..`
        writes, all in one transaction. Returns (sent, committed)."""
        ops: list[dict] = []
        ports = []
        for index, (name, local_ip, remote_ip) in enumerate(tunnels):
            options = ["map", sorted([["local_ip", local_ip], ["psk", PSK], ["remote_ip", remote_ip],
                                      *map(list, extra_options)])]
            ops.append({"op": "insert", "table": "Interface", "uuid-name": f"i{index}",
                        "row": {"name": name, "type": "geneve", "options": options}})
            ops.append({"op": "insert", "table": "Port", "uuid-name": f"p{index}",
                        "row": {"name": name, "interfaces": ["named-uuid", f"i{index}"]}})
            ports.append(["named-uuid", f"p{index}"])
        ops.append({"op": "mutate", "table": "Bridge", "where": [["name", "==", BRIDGE]],
                    "mutations": [["ports", "insert", ["set", ports]]]})
        _, sent, committed = self.transact(*ops)
        return sent, committed

    def port_uuid(self, name: str) -> list:
        result, _, _ = self.transact({"op": "select", "table": "Port", "where": [["name", "==", name]],
                                      "columns": ["_uuid"]})
        return result[0]["rows"][0]["_uuid"]

    def delete_port(self, port_uuid: list) -> tuple[float, float]:
        """Remove the port from the bridge; OVSDB garbage-collects the Port and Interface rows."""
        _, sent, committed = self.transact({"op": "mutate", "table": "Bridge", "where": [["name", "==", BRIDGE]],
                                            "mutations": [["ports", "delete", ["set", [port_uuid]]]]})
        return sent, committed

    def clear_ports(self) -> None:
        self.transact({"op": "update", "table": "Bridge", "where": [["name", "==", BRIDGE]],
                       "row": {"ports": ["set", []]}})


# -- the kernel SPD: how many trap policies charon installed -----------------------------------

_CLONE_NEWNET = 0x40000000
_XFRM_MSG_GETSPDINFO = 0x25
_NETLINK_XFRM = 6


class SpdCounter:
    """`ip xfrm policy count` without a fork: an XFRM netlink socket opened inside the namespace.

    A child config with start_action=trap (ours and the floor) or a routed stroke conn (upstream's
    auto=route) puts one OUT policy in the SPD when charon has it; reading the count costs a few
    microseconds, so it can be polled every millisecond without disturbing anyone.
    """

    def __init__(self, netns: str) -> None:
        holder: dict = {}

        def open_inside() -> None:  # setns() moves only this thread; the socket keeps the namespace
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    holder["error"] = OSError(ctypes.get_errno(), f"setns {netns}")
                    return
                holder["sock"] = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_XFRM)
            finally:
                os.close(fd)

        thread = threading.Thread(target=open_inside)
        thread.start()
        thread.join()
        if "error" in holder:
            raise holder["error"]
        self._sock = holder["sock"]
        self._sock.bind((0, 0))
        self._seq = 0

    def counts(self) -> tuple[int, int, int]:
        """(IN, OUT, FWD) policies."""
        self._seq += 1
        payload = struct.pack("=I", 0xFFFFFFFF)
        self._sock.send(struct.pack("=IHHII", 16 + len(payload), _XFRM_MSG_GETSPDINFO, 1, self._seq, 0) + payload)
        data = self._sock.recv(65536)
        length, kind = struct.unpack_from("=IH", data)
        offset = 16 + 4
        while offset + 4 <= length:
            attr_len, attr_type = struct.unpack_from("=HH", data, offset)
            if attr_type == 1:  # XFRMA_SPD_INFO: incnt, outcnt, fwdcnt, ...
                return struct.unpack_from("=III", data, offset + 4)
            offset += (attr_len + 3) & ~3
        raise RuntimeError(f"no SPD info in netlink reply type {kind}")

    def out(self) -> int:
        return self.counts()[1]

    def close(self) -> None:
        self._sock.close()


# -- pluto: how many connections it holds, from its log ----------------------------------------

class PlutoConns:
    """The pluto connections whose name starts with prefix, as pluto's own log tells them: each
    `"NAME": added IKEv2 connection` adds one, each `"NAME": terminating SAs using this connection`
    (what `whack --delete` logs, SAs or not) removes it.

    The SPD is no signal for pluto here: ours adds responder connections (auto=add) and upstream
    adds and initiates them (`ipsec auto --start`), so neither installs a policy while loading.
    Asking pluto (`whack --status`) would cost it a full listing per poll; the log costs it nothing
    and reading what was appended since the last poll costs microseconds.
    """

    _EVENT = re.compile(r'"(?P<name>[^"]+)"(?:\[\d+\])?: (?P<what>added IKEv2 connection|'
                        r'terminating SAs using this connection)$')

    def __init__(self, path: Path, prefix: str, offset: int = 0) -> None:
        self._path, self._prefix, self._offset = path, prefix, offset
        self._partial = b""
        self.names: set[str] = set()

    def count(self) -> int:
        try:
            with open(self._path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return len(self.names)
        self._offset += len(chunk)
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        for raw in complete:
            match = self._EVENT.search(raw.decode(errors="replace"))
            if match and match["name"].startswith(self._prefix):
                if match["what"].startswith("added"):
                    self.names.add(match["name"])
                else:
                    self.names.discard(match["name"])
        return len(self.names)


def pluto_conn_tunnel(name: str) -> str:
    """The tunnel a pluto connection is for: ours are <peering>_gnv1-in-<digest>, upstream's gnv1-in-1."""
    return name.rsplit("_", 1)[-1].rsplit("-", 2)[0]


def pluto_tunnels(status: str, prefix: str) -> dict:
    """What `whack --status` says pluto holds of one implementation's connections: how many, how
    many are tunnel children (ours also adds one anchor per peering, `<peering>_ike`), for how many
    distinct tunnels, how many are routed (trap policies), and pluto's IKE SA totals."""
    from ovs_ipsec.backends.libreswan import parse

    names = {name for name in parse.loaded_conns(status) if name.startswith(prefix)}
    anchors = {name for name in names if name.endswith("_ike")}
    tunnels = {pluto_conn_tunnel(name) for name in names - anchors}
    unrouted = sum(1 for line in parse.lines(status)
                   if "; unrouted;" in line and (line[1:].split('"', 1)[0] in names))
    ike = re.search(r"IKE SAs: total\((\d+)\), half-open\((\d+)\)", status)
    return {"pluto_conns": len(names), "children": len(names - anchors), "anchors": len(anchors),
            "tunnels": len(tunnels), "routed": len(names) - unrouted,
            "ike_sas": int(ike[1]) if ike else None, "ike_sas_half_open": int(ike[2]) if ike else None}


# -- process meters --------------------------------------------------------------------------

def cpu_ticks(pid: int) -> tuple[float, float]:
    """(self utime+stime, waited-for children cutime+cstime) in seconds, from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan"), float("nan")
    fields = text[text.rindex(")") + 2:].split()
    utime, stime, cutime, cstime = (int(fields[i - 3]) for i in (14, 15, 16, 17))
    return (utime + stime) / HZ, (cutime + cstime) / HZ


def cpu_ns(pid: int) -> int:
    """Nanoseconds on CPU of every live thread of PID (schedstat: precise where stat counts ticks)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def memory_kb(pid: int) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return values


def system_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat: how contended a cell was."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass
class Meter:
    """CPU of a process (and, when asked, of its waited-for children) between two points."""

    pid: int
    children: bool

    def ns(self) -> int:
        """Precise self time plus children's ticks (children only count once reaped)."""
        value = cpu_ns(self.pid)
        if self.children:
            value += int(cpu_ticks(self.pid)[1] * 1e9)
        return value

    def ticks(self) -> float:
        own, waited = cpu_ticks(self.pid)
        return own + (waited if self.children else 0.0)

    def busy_now(self) -> bool:
        return self.children and bool(live_children(self.pid))


@dataclass
class WatchResult:
    reached_at: float | None  # wall time the target was first observed (None: not within the limit)
    idle_at: float | None  # end of the last busy sample before the quiet period (None: never quiet)
    cpu_s: float  # precise CPU between the start of the watch and idle_at (or the end of the watch)
    samples: int = 0
    timeline: list = field(default_factory=list)


def watch(meter: Meter | None, target, *, limit: float, quiet: float, interval: float,
          start: float | None = None, give_up_quiet: float | None = None) -> WatchResult:
    """Poll until `target()` is true and the process has then been quiet for `quiet` seconds.

    A sample counts as busy when the process used more than a quarter of the sample's length on
    CPU or has a live child. `target` is checked every sample until it holds; `meter` may be None
    (nothing to wait for but the target). With give_up_quiet, a process quiet that long while the
    target still does not hold ends the watch early (reached_at None, idle_at set).
    """
    start = start or time.time()
    reached = None
    last_busy = None
    previous = meter.ns() if meter else 0
    first_ns = previous
    idle_ns = None
    previous_t = time.time()
    samples = 0
    while True:
        now = time.time()
        samples += 1
        if reached is None and target():
            reached = time.time()
        if meter is not None:
            current = meter.ns()
            if current - previous > 0.25 * (now - previous_t) * 1e9 or meter.busy_now():
                last_busy = now
                idle_ns = None
            elif idle_ns is None:
                idle_ns = current
            previous, previous_t = current, now
        quiet_since = last_busy or start
        if reached is not None and (meter is None or now - quiet_since >= quiet):
            end_ns = idle_ns if idle_ns is not None else previous
            return WatchResult(reached, quiet_since if meter else reached, (end_ns - first_ns) / 1e9, samples)
        if reached is None and meter is not None and give_up_quiet and now - quiet_since >= give_up_quiet:
            end_ns = idle_ns if idle_ns is not None else previous
            return WatchResult(None, quiet_since, (end_ns - first_ns) / 1e9, samples)
        if now - start > limit:
            return WatchResult(reached, None, ((meter.ns() if meter else 0) - first_ns) / 1e9, samples)
        time.sleep(interval)


def wait_quiet(meter: Meter, quiet: float, limit: float) -> WatchResult:
    return watch(meter, lambda: True, limit=limit, quiet=quiet, interval=0.02)


# -- charon over VICI --------------------------------------------------------------------------

def vici_session(path: str, timeout: float = 60.0):
    import vici

    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(path)
    return vici.Session(sock)


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def charon_children(path: str, prefix: str) -> tuple[int, int]:
    """(connections, child configs) whose connection name starts with prefix, from list-conns
    (every backend: vici-loaded and stroke-loaded alike)."""
    conns = children = 0
    for event in vici_session(path).list_conns():
        for name, details in event.items():
            if text(name).startswith(prefix):
                conns += 1
                children += len(details.get("children") or {})
    return conns, children


def ike_sa_counts(session) -> tuple[int, int]:
    """(IKE SAs, half-open) from charon's `stats`: cheap enough to poll while 1000 SAs come up."""
    stats = session.stats()
    ikesas = stats["ikesas"]
    return int(text(ikesas["total"])), int(text(ikesas["half-open"]))


def established_sas(path: str) -> int:
    count = 0
    for event in vici_session(path).list_sas({"noblock": "yes"}):
        for details in event.values():
            if text(details.get("state", b"")) == "ESTABLISHED":
                count += 1
    return count


def wait_socket(path: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            sock.close()
    raise TimeoutError(f"nothing answers on {path} after {timeout:g} s")


# The establishment cell's proposals: ours' default (curve25519 first, MODP-2048 kept for upstream
# peers) and upstream's MODP-2048 only, which ours gets through options:ipsec_ike/ipsec_esp.
PROPOSALS = {
    "modern": ("aes256gcm16-sha256-curve25519-modp2048", "aes256gcm16-curve25519-modp2048"),
    "modp2048": ("aes256gcm16-sha256-modp2048", "aes256gcm16-modp2048"),
}


def est_b_ip(index: int) -> str:
    """The establishment cell's B address of tunnel `index` (from 1): B holds them all as aliases."""
    return f"10.220.{(index - 1) // 250 + 1}.{(index - 1) % 250 + 1}"


def remote_ip(index: int, base: str = "10.201") -> str:
    """The index-th (from 1) distinct remote address in base.0.0/16: every tunnel its own peering."""
    return f"{base}.{(index - 1) // 250}.{(index - 1) % 250 + 1}"


def trigger(netns: str, addresses: list[str]) -> None:
    """One UDP packet to each address on Geneve's port: each hits its tunnel's trap policy, and the
    kernel's ACQUIRE makes charon initiate (the research's trigger2.py), for upstream, which
    initiates only on traffic. Paced at 1000 packets/s (10 every 10 ms): charon 5.9.8 reads ACQUIREs
    on an event socket with the default 208 KiB buffer (receive_buffer_size does not reach that
    socket) and, busy with DH, drains it slowly; 1000 at once lost ~78% of them here, 50 every 10 ms
    still ~66% (a lost ACQUIRE leaves no larval state, so real traffic would retry; one packet would
    not)."""
    code = ("import socket,sys,time\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "for i,a in enumerate(sys.argv[1:]):\n"
            "    try: s.sendto(b'x',(a,6081))\n"
            "    except OSError: pass\n"
            "    if i%10==9: time.sleep(0.01)\n")
    subprocess.run(["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", code, *addresses], check=True,
                   timeout=60)
