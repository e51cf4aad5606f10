"""The plaintext guard on a real kernel: tcpdump on the underlay is the judge.

Hosts are network namespaces (testsupport). Senders are small Python processes in a host's
namespace writing tunnel-shaped packets (UDP to the tunnel port, raw GRE) from marked or unmarked
sockets, as the kernel datapath would with or without an OpenFlow pkt_mark. This kernel has no
ESP, so no CHILD_SA ever exists: every tunnel packet must be held or dropped, and the capture
must show none of the guarded ones while daemons restart and the configuration changes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from testsupport.tunnels import add_pair, add_tunnel, charon_conns
from ovs_ipsec.guard.policy import GUARD_PRIORITY
from ovs_ipsec.validate import parse_skb_mark
from testsupport.procs import wait_for

LET_THROUGH_SPORT = 40001  # the sender the mode lets through (marked in 0/1, unmarked in 1/1)

SENDER = r"""
import json, signal, socket, sys, time
family, dst, port, mark, sport = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
af = socket.AF_INET6 if family == "6" else socket.AF_INET
if port == "gre":
    sock, address, payload = socket.socket(af, socket.SOCK_RAW, 47), (dst, 0), b"\x00\x00\x65\x58" + b"x" * 8
else:
    sock, address, payload = socket.socket(af, socket.SOCK_DGRAM), (dst, int(port)), b"x" * 8
    if sport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", sport))
if mark >= 0:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
counts = {"sent": 0, "refused": 0}
def stop(*_):
    print(json.dumps(counts), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    try:
        sock.sendto(payload, address)
        counts["sent"] += 1
    except OSError:
        counts["refused"] += 1
    time.sleep(0.01)
"""

RECEIVER = r"""
import json, select, signal, socket, sys
family, port = sys.argv[1], sys.argv[2]
af = socket.AF_INET6 if family == "6" else socket.AF_INET
if port == "gre":
    sock = socket.socket(af, socket.SOCK_RAW, 47)
else:
    sock = socket.socket(af, socket.SOCK_DGRAM)
    if af == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("", int(port)))
received = {}
def stop(*_):
    print(json.dumps(received), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    data, peer = sock.recvfrom(65535)
    received[peer[0]] = received.get(peer[0], 0) + 1
"""


class Program:
    """A helper process in a host's namespace, stopped by PID, reporting a JSON line at the end."""

    def __init__(self, started: list, host, code: str, *args: object) -> None:
        self.process = subprocess.Popen(host.netns(sys.executable, "-c", code, *map(str, args)),
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)
        started.append(self.process)  # killed at teardown whatever happens
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        return json.loads(out.strip().splitlines()[-1])


class Capture:
    """tcpdump on a host's underlay device, started before and stopped after the scenario."""

    def __init__(self, started: list, host, path) -> None:
        self.path = str(path)
        self.process = subprocess.Popen(host.netns("tcpdump", "-i", host.device, "-nn", "-q", "-U", "-Z", "root",
                                                   "-w", self.path, "udp or ip proto 47 or ip6 proto 47"),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        started.append(self.process)
        wait_for(lambda: "listening on" in self.process.stderr.readline(), 10, what="tcpdump to listen")

    def stop(self) -> list[str]:
        time.sleep(0.3)  # packets in flight
        self.process.send_signal(signal.SIGINT)
        self.process.communicate(timeout=10)
        return subprocess.run(["tcpdump", "-nn", "-q", "-r", self.path], capture_output=True, text=True,
                              check=True).stdout.splitlines()


PACKET = re.compile(r"^\S+ IP6? (?P<src>\S+) > (?P<dst>\S+?):? (?P<rest>.*)$")


def tunnel_packets(lines: list[str], src_addresses, ports) -> tuple[list[str], int]:
    """(plaintext guarded tunnel packets, packets of the let-through sender) among the capture lines."""
    leaked, let_through = [], 0
    for line in lines:
        match = PACKET.match(line)
        if not match:
            continue
        gre = "GRE" in match["rest"] or "ip-proto-47" in match["rest"]
        src_host, _, src_port = match["src"].rpartition(".")
        dst_port = match["dst"].rpartition(".")[2]
        if gre:
            src_host = match["src"]
        if src_host not in src_addresses:
            continue
        if src_port == str(LET_THROUGH_SPORT):
            let_through += 1
        elif gre or dst_port in ports:
            leaked.append(line)
    return leaked, let_through


def guard_of(host) -> dict:
    return host.status()["guard"]


def wait_guard(host, mode: str, timeout: float = 20) -> dict:
    return wait_for(lambda: (g := guard_of(host))["mode"] == mode and g["in_place"] and g, timeout,
                    what=f"guard {mode} in place on {host.name} (now {guard_of(host)})")


def our_policies(host) -> list[str]:
    text = subprocess.run(["ip", "-n", host.name, "xfrm", "policy"], capture_output=True, text=True,
                          check=True).stdout
    return [block for block in re.split(r"\n(?=\S)", text) if f"priority {GUARD_PRIORITY} " in block]


def all_policies(host) -> str:
    return subprocess.run(["ip", "-n", host.name, "xfrm", "policy"], capture_output=True, text=True,
                          check=True).stdout


def charon_policies(host) -> list[str]:
    """The IKE daemon's policies: the ones with an ESP template (trap or SA)."""
    return [block for block in re.split(r"\n(?=\S)", all_policies(host)) if "tmpl" in block]


@pytest.fixture
def started():
    """Helper processes (senders, receivers, tcpdump): each killed by its PID at teardown."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture
def guarded_hosts(sandbox):
    """Hosts a and b with ovsdb-server and charon, the mode set, tunnels configured: no monitor yet."""
    a = sandbox.add_host("a", "10.231.0.1/24", "fd00:231::1/64")
    b = sandbox.add_host("b", "10.231.0.2/24", "fd00:231::2/64")
    for host in (a, b):
        host.start_ovsdb()
        host.start_charon()
    return a, b


@pytest.mark.parametrize("mode, guarded_mark, free_mark", [("0/1", -1, 1), ("1/1", 1, -1)])
def test_no_plaintext_leaves_through_restarts_and_changes(guarded_hosts, sandbox, started, mode, guarded_mark,
                                                         free_mark):
    a, b = guarded_hosts
    for host in (a, b):
        host.vsctl("set", "Open_vSwitch", ".", f"other_config:ipsec_skb_mark={mode}")
    add_pair(a, b, "gnv", "geneve", psk="swordfish")
    add_pair(a, b, "vx", "vxlan", psk="swordfish", dst_port="7000")
    add_tunnel(a, b, "gnv6", "geneve", family=6, psk="swordfish")
    add_tunnel(b, a, "gnv6", "geneve", family=6, psk="swordfish")
    for host in (a, b):
        host.start_monitor()
    wait_guard(a, mode)
    wait_guard(b, mode)
    log = a.log_text()
    assert log.index(f"plaintext guard {mode}: ") < log.index("LoadConn")  # guard first

    capture = Capture(started, b, sandbox.workdir / "b.pcap")
    guarded = [Program(started, a, SENDER, 4, b.address, port, guarded_mark, 0)
               for port in ("6081", "7000", "4789", "gre")]
    guarded += [Program(started, a, SENDER, 6, b.addresses[1], port, guarded_mark, 0) for port in ("6081", "gre")]
    free = Program(started, a, SENDER, 4, b.address, "4789", free_mark, LET_THROUGH_SPORT)
    other = Program(started, a, SENDER, 4, b.address, "9999", guarded_mark, 0)  # not a tunnel port
    receiver = Program(started, b, RECEIVER, 4, "9999")
    try:
        a.wait_ike_up("gnv", timeout=30)  # IKE is never blocked

        a.stop_monitor(hard=True)  # kill -9: the policies stay in the kernel
        time.sleep(1)
        a.start_monitor()
        wait_guard(a, mode)

        conns = charon_conns(a)
        a.stop_charon()  # a clean stop removes charon's own policies: only the guard is left
        time.sleep(1)
        assert charon_policies(a) == []
        a.start_charon()
        wait_for(lambda: charon_conns(a) == conns, 30, what="connections reloaded into the new charon")
        a.wait_ike_up("gnv", timeout=60)

        a.vsctl("del-port", "gnv")  # charon's policies for it go; its traffic must not
        add_pair(a, b, "gre", "gre", psk="swordfish")
        a.wait_ike_up("gre", timeout=30)
        wait_for(lambda: a.tunnel("gnv") is None, 10, what="gnv removed")

        a.stop_ovsdb()
        time.sleep(1)
        a.start_ovsdb()
        add_tunnel(a, b, "gre6", "gre", family=6, psk="swordfish")  # seen once the monitor is reconnected
        wait_for(lambda: a.tunnel("gre6") is not None, 30, what="the monitor back on OVSDB")
        a.appctl("refresh")
        wait_guard(a, mode)
    finally:
        counts = [sender.stop() for sender in guarded]
        free_counts, other_counts = free.stop(), other.stop()
        received = receiver.stop()
        lines = capture.stop()
    leaked, let_through = tunnel_packets(lines, set(a.addresses), {"6081", "7000", "4789"})
    assert leaked == [], f"{len(leaked)} plaintext tunnel packets on the wire, first: {leaked[:3]}"
    assert all(c["sent"] + c["refused"] > 100 for c in counts)  # the senders really tried
    assert let_through > 50 and free_counts["refused"] == 0  # the mode lets this one through
    assert received.get(a.address, 0) > 50 and other_counts["refused"] == 0  # non-tunnel traffic flows
    assert subprocess.run(a.netns("ping", "-c1", "-W2", b.address), capture_output=True).returncode == 0
    assert any(".500 > " in line for line in lines)  # IKE on the wire
    b.wait_ike_up("gre", timeout=30)
    assert a.tunnel("gre")["ike_sas"] > 0


def test_inbound_plaintext_from_an_ipsec_peer_is_dropped_without_the_ike_daemon(sandbox, started):
    a = sandbox.add_host("a", "10.231.0.1/24", "fd00:231::1/64")
    b = sandbox.add_host("b", "10.231.0.2/24", "fd00:231::2/64", "10.231.0.3/24")
    a.start_ovsdb()  # no charon on a: the guard must not need it
    a.vsctl("set", "Open_vSwitch", ".", "other_config:ipsec_skb_mark=1/1")  # inbound ignores marks
    add_tunnel(a, b, "gnv", "geneve", psk="swordfish")
    add_tunnel(a, b, "gre", "gre", psk="swordfish")
    add_tunnel(a, b, "gnv6", "geneve", family=6, psk="swordfish")
    a.start_monitor()
    status = wait_guard(a, "1/1")
    assert a.status()["ike_daemon"]["reachable"] is False and status["error"] is None

    def exchange() -> dict:
        receivers = {name: Program(started, a, RECEIVER, family, port) for name, family, port in (
            ("geneve", 4, 6081), ("gre", 4, "gre"), ("geneve6", 6, 6081), ("other", 4, 9999))}
        senders = [Program(started, b, SENDER, family, address, port, -1, 0) for family, address, port in (
            (4, a.address, 6081), (4, a.address, "gre"), (6, a.addresses[1], 6081), (4, a.address, 9999))]
        # the same packets from an address of b that is no IPsec peer of a
        senders.append(Program(started, b, SENDER.replace('bind(("", sport))', 'bind(("10.231.0.3", sport))'),
                               4, a.address, 6081, -1, 40002))
        time.sleep(1.5)
        for sender in senders:
            sender.stop()
        return {name: receiver.stop() for name, receiver in receivers.items()}

    guarded = exchange()
    assert guarded["geneve"].get(b.address, 0) == 0
    assert guarded["gre"].get(b.address, 0) == 0
    assert guarded["geneve6"].get(b.addresses[1], 0) == 0
    assert guarded["geneve"].get("10.231.0.3", 0) > 10  # not an IPsec peer: accepted
    assert guarded["other"].get(b.address, 0) > 10  # not a tunnel port: accepted

    # A policy of higher precedence for the same traffic decides alone, as charon's inbound
    # policy (with its ESP template) does once loaded: the guard never overrides the IKE daemon.
    charon_like = ["src", f"{b.address}/32", "dst", f"{a.address}/32", "proto", "udp", "dport", "6081", "dir", "in",
                   "action", "allow", "priority", "366912"]
    subprocess.run(["ip", "-n", a.name, "xfrm", "policy", "add", *charon_like], check=True)
    preceded = exchange()
    assert preceded["geneve"].get(b.address, 0) > 10 and preceded["gre"].get(b.address, 0) == 0

    a.vsctl("remove", "Open_vSwitch", ".", "other_config", "ipsec_skb_mark")
    wait_guard(a, "off")
    assert our_policies(a) == [] and "priority 366912" in all_policies(a)
    unguarded = exchange()
    assert unguarded["geneve"].get(b.address, 0) > 10 and unguarded["gre"].get(b.address, 0) > 10


def test_drift_is_repaired_mode_off_and_exit_remove_exactly_our_policies(sandbox):
    a = sandbox.add_host("a", "10.231.0.1/24", "fd00:231::1/64")
    a.start_ovsdb()
    a.start_charon()
    a.vsctl("set", "Open_vSwitch", ".", "other_config:ipsec_skb_mark=0x0/0x1")
    add_tunnel(a, a, "gnv", "geneve", remote_ip="10.231.0.2", psk="swordfish")  # peer absent: trap only
    foreign = ["src", "10.231.0.1/32", "dst", "10.231.0.99/32", "proto", "udp", "dport", "4789", "dir", "out",
               "action", "block", "priority", "5000"]
    subprocess.run(["ip", "-n", a.name, "xfrm", "policy", "add", *foreign], check=True)
    a.start_monitor()
    wanted = wait_guard(a, "0/1")["wanted"]
    wait_for(lambda: charon_policies(a), 20, what="charon's trap policies")
    time.sleep(1)  # all of them
    trap_policies = charon_policies(a)
    assert len(our_policies(a)) == wanted
    show = a.appctl("tunnels/show")
    assert f"Plaintext guard: 0/1, {wanted} XFRM policies in place" in show

    # someone deletes one of ours and turns another into an allow policy: a refresh puts them back
    subprocess.run(["ip", "-n", a.name, "xfrm", "policy", "delete", "src", "10.231.0.2/32", "dst", "0.0.0.0/0",
                    "proto", "udp", "dport", "6081", "dir", "in"], check=True)
    subprocess.run(["ip", "-n", a.name, "xfrm", "policy", "update", "src", "::/0", "dst", "::/0", "proto", "gre",
                    "dir", "out", "mark", "0", "mask", "1", "action", "allow", "priority", str(GUARD_PRIORITY)],
                   check=True)
    a.appctl("refresh")
    wait_guard(a, "0/1")
    assert len(our_policies(a)) == wanted
    assert all("action block" in block for block in our_policies(a))

    # a malformed value: reported, and the guard in force stays
    a.vsctl("set", "Open_vSwitch", ".", "other_config:ipsec_skb_mark=0/x")
    guard = wait_for(lambda: (g := guard_of(a))["error"] and g, 10, what="the error in status")
    assert guard["mode"] == "0/1" and guard["in_place"] and "mask 'x' is not a number" in guard["error"]
    assert len(our_policies(a)) == wanted

    a.stop_monitor(cleanup=False)  # exit --no-cleanup leaves the guard
    assert len(our_policies(a)) == wanted
    a.start_monitor()
    assert wait_for(lambda: guard_of(a)["error"], 10, what="error after restart")  # mode read from the kernel
    assert guard_of(a)["mode"] == "0/1" and len(our_policies(a)) == wanted

    a.vsctl("remove", "Open_vSwitch", ".", "other_config", "ipsec_skb_mark")  # the operator turns it off
    wait_guard(a, "off")
    policies = all_policies(a)
    assert our_policies(a) == [] and "dst 10.231.0.99/32" in policies and "priority 5000" in policies
    assert charon_policies(a) == trap_policies  # charon's untouched

    a.vsctl("set", "Open_vSwitch", ".", "other_config:ipsec_skb_mark=1/1")
    wait_guard(a, "1/1")
    a.stop_monitor(cleanup=True)  # exit with cleanup removes the guard, and only it
    policies = all_policies(a)
    assert our_policies(a) == [] and "dst 10.231.0.99/32" in policies
    assert os.path.exists(a.workdir / "ovs-monitor-ipsec.log")


# mode -> the marks whose packets it drops, among the senders' marks (0: unmarked)
TRANSITIONS = [(None, set()), ("0/1", {0, 2, 0x10}), ("1/1", {1}), ("0x2/0x2", {2}), ("0x10/0x10", {0x10}),
               ("0/1", {0, 2, 0x10}), (None, set())]
SENDER_MARKS = {0: 41000, 1: 41001, 2: 41002, 0x10: 41016}  # mark -> the sender's source port


def test_every_mode_change_is_exact_judged_by_packets(sandbox, started):
    """0/1 -> 1/1 left the old mode's block policies behind (fixed): after each change, what the new
    mode lets through arrives and what it guards does not, and the kernel holds exactly its policies."""
    a = sandbox.add_host("a", "10.231.0.1/24")
    b = sandbox.add_host("b", "10.231.0.2/24")
    a.start_ovsdb()  # no IKE daemon: the guard alone decides
    add_tunnel(a, b, "gnv", "geneve", psk="swordfish")
    a.start_monitor()
    senders = [Program(started, a, SENDER, 4, b.address, "6081", mark if mark else -1, sport)
               for mark, sport in SENDER_MARKS.items()]
    try:
        for mode, dropped in TRANSITIONS:
            if mode is None:
                a.vsctl("remove", "Open_vSwitch", ".", "other_config", "ipsec_skb_mark")
            else:
                a.vsctl("set", "Open_vSwitch", ".", f"other_config:ipsec_skb_mark={mode}")
            guard = wait_guard(a, "off" if mode is None else str(parse_skb_mark(mode)))
            assert guard["policies"] == guard["wanted"] == len(our_policies(a))
            capture = Capture(started, b, sandbox.workdir / f"b-{str(mode).replace('/', '_')}.pcap")
            time.sleep(1.0)
            lines = capture.stop()
            arrived = {mark for mark, sport in SENDER_MARKS.items()
                       if any(f"{a.address}.{sport} > " in line for line in lines)}
            assert arrived == set(SENDER_MARKS) - dropped, f"mode {mode}: arrived from marks {sorted(arrived)}"
    finally:
        for sender in senders:
            sender.stop()
