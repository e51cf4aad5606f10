"""LibreSwan without polling, against real plutos: SA changes reach the monitor through our updown
command (a hint on its unixctl socket), restarts through a watch on pluto's run directory, and
connections are added in batches with each failure attributed to its own connection."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from ovs_ipsec.backends.libreswan import parse
from testsupport.daemons import libreswan_missing
from testsupport.procs import wait_for
from testsupport.tunnels import add_pair

pytestmark = pytest.mark.skipif(bool(libreswan_missing()), reason=libreswan_missing() or "")


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(own utime+stime, waited-for children's) in clock ticks."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def states(host) -> list[parse.PlutoState]:
    return parse.states(host.whack("--showstates"))


def test_an_sa_deleted_behind_our_back_is_noticed_within_a_second_and_idle_costs_nothing(lsw_hosts):
    a, b = lsw_hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    for host in (a, b):
        host.wait_ike_up("tun")
    # This kernel has no ESP: Child SAs never install, and the initiator's monitor retries them
    # (with backoff). Stop it, so the responder sees no activity at all.
    initiator, responder = (a, b) if "Initiate" in a.log_text() else (b, a)
    initiator.monitor.stop(hard=True)
    time.sleep(1.0)

    # Idle: no timer, so no `ipsec whack` child and (almost) no CPU of its own. The old poller ran
    # `whack --showstates` through the ipsec script every 2 s: several ticks of child CPU here.
    pid = responder.monitor.pid()
    before = cpu_ticks(pid)
    time.sleep(6.0)
    after = cpu_ticks(pid)
    assert after[1] == before[1], "the idle monitor ran commands"
    assert after[0] - before[0] <= 1

    # The IKE SA deleted behind the responder's monitor's back: by hand, with whack, on the other
    # side (whose pluto sends a Delete; deleting it on the responder instead, the initiator's pluto
    # revives it within milliseconds). Seen within a second.
    names = [n for n in parse.loaded_conns(initiator.whack("--status")) if n.startswith("ovsipsec-")]
    assert any(s.established and not s.child for s in states(responder))
    started = time.monotonic()
    for name in sorted(names, key=lambda n: n.endswith("_ike")):  # the anchor, which holds the IKE SA, last
        initiator.whack("--name", name, "--delete")
    wait_for(lambda: responder.tunnel("tun")["ike_sas"] == 0, 5, interval=0.01, what="the deleted IKE SA seen")
    assert time.monotonic() - started < 1.0


def test_a_hostile_or_unknown_hint_is_refused_and_logged_escaped(lsw_hosts):
    a, _b = lsw_hosts
    hostile = "ovsipsec-10.0.0.1-0123456789_x\n2026-01-01 forged line"
    for name in (hostile, "myvpn", "ovsipsec-10.0.0.1-0123456789_ike;reboot"):
        result = subprocess.run(["ovs-appctl", "-t", a.unixctl, "ipsec/lsw-event", name, "down-host"],
                                capture_output=True, text=True, timeout=10)
        assert result.returncode != 0 and "not one of our connections" in result.stderr
    log = a.log_text()
    assert "forged line" in log and "\n2026-01-01 forged line" not in log  # escaped: one line
    assert "_x\\n2026-01-01 forged line" in log
    # A well-formed name of ours is only a hint: the monitor looks at it, finds nothing, does nothing.
    good = "ovsipsec-10.0.0.1-0123456789_ike"
    subprocess.run(["ovs-appctl", "-t", a.unixctl, "ipsec/lsw-event", good, "up-host"], check=True, timeout=10)
    assert not os.path.exists(a.lsw_root / "etc/ipsec.d/ovsipsec-10.0.0.1-0123456789.conf")


def test_a_pluto_restart_is_noticed_without_polling(lsw_hosts):
    a, b = lsw_hosts
    add_pair(a, b, "tun", "geneve", psk="swordfish")
    a.wait_ike_up("tun")
    log_before = len(a.log_text())
    a.stop_pluto()
    a.start_pluto()
    wait_for(lambda: "restarted" in a.log_text()[log_before:], 10, what="the monitor noticing the restart")
    a.wait_ike_up("tun", timeout=60)


def test_a_batch_with_one_bad_connection_loads_the_others(sandbox):
    """17 peerings (one per remote) in one transaction; pluto refuses the one with a proposal it
    does not know (addconn says nothing, and in a batch even exits 0). The other 16 load, in one
    `addconn`; the bad one fails alone, with its own reason."""
    a = sandbox.add_host("a", "10.231.0.1/24", "fd00:231::1/64", ike_daemon="libreswan")
    a.start_ovsdb()
    a.start_ike_daemon()
    # Count the monitor's addconn calls: a wrapper in front of the sandbox's `ipsec`.
    ipsec = a.lsw_root / "usr/sbin/ipsec"
    ipsec.rename(ipsec.with_name("ipsec.real"))
    calls = a.lsw_root.parent / "addconn-calls"
    ipsec.write_text(f'#!/bin/sh\n[ "$1" = addconn ] && echo "$*" >> {calls}\nexec {ipsec}.real "$@"\n')
    ipsec.chmod(0o755)
    a.start_monitor()
    argv = []
    for i in range(17):
        name = f"t{i}"
        options = ["options:local_ip=10.231.0.1", f"options:remote_ip=10.231.0.{20 + i}", "options:psk=swordfish"] \
            + (["options:ipsec_ike=aes256gcm16-sha256-modp2048"] if i == 7 else [])
        argv += ["--", "add-port", "br-ipsec", name, "--", "set", "interface", name, "type=geneve", *options]
    a.vsctl(*argv[1:])
    wait_for(lambda: (t := a.tunnel("t7")) and "exit status 36" in (t.get("reason") or ""), 30,
             what="t7 failing with pluto's reason")
    loaded = parse.loaded_conns(a.whack("--status"))
    good = [a.tunnel(f"t{i}")["conn"] for i in range(17) if i != 7]
    assert all(f"{conn}_ike" in loaded for conn in good)
    assert not any(name.startswith(a.tunnel("t7")["conn"]) for name in loaded)
    for i in range(17):
        assert i == 7 or not a.tunnel(f"t{i}").get("reason"), a.tunnel(f"t{i}")
    first_pass = calls.read_text().splitlines()
    # One batch, then the bad one alone (and its retries, with backoff): not 17, one per peering.
    assert re.search(r"--config \S+/\.ovsipsec-batch-", first_pass[0])
    assert all("ovsipsec-batch" not in call and a.tunnel("t7")["conn"] in call for call in first_pass[1:]), first_pass
