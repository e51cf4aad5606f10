"""`ovs-ipsec boot-guard` (ovs-ipsec-guard.service, before ovs-vswitchd at boot) on a real kernel's
XFRM policies, read from a real ovsdb-server; `--release` against a real monitor and charon."""

from __future__ import annotations

import re
import subprocess
import sys

from ovs_ipsec.cli.boot_guard import HOLD_PRIORITY
from ovs_ipsec.guard.policy import GUARD_PRIORITY

CLI = [sys.executable, "-m", "ovs_ipsec.cli.main"]


def policies(host, priority: int) -> list[str]:
    text = subprocess.run(host.netns("ip", "xfrm", "policy"), capture_output=True, text=True, check=True).stdout
    return [block for block in re.split(r"\n(?=\S)", text) if f"priority {priority} " in block]


def boot_guard(host, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(host.netns(*CLI, "boot-guard", host.db, *args), env=host.env,
                          capture_output=True, text=True, timeout=60)


def add_psk_tunnel(host, name: str, peer: str, port: str | None = None) -> None:
    extra = [f"options:dst_port={port}"] if port else []
    host.vsctl("add-port", "br-ipsec", name, "--", "set", "interface", name, "type=geneve",
               f"options:remote_ip={peer}", "options:psk=swordfish", *extra)


def test_with_skb_mark_the_guard_itself_before_vswitchd(sandbox):
    a = sandbox.add_host("a", "10.231.0.1/24")
    a.start_ovsdb()
    a.vsctl("set", "Open_vSwitch", ".", "other_config:ipsec_skb_mark=0/1")
    add_psk_tunnel(a, "gnv0", "10.231.0.2", port="7000")
    done = boot_guard(a)
    assert done.returncode == 0, done.stderr
    guard = policies(a, GUARD_PRIORITY)
    assert any("dport 7000" in p and "dir out" in p and "mark 0/0x1" in p and "action block" in p for p in guard)
    assert any("src 10.231.0.2/32" in p and "dir in" in p for p in guard)
    assert policies(a, HOLD_PRIORITY) == []


def test_without_skb_mark_holds_until_the_monitor_loaded_the_tunnels(sandbox):
    a = sandbox.add_host("a", "10.231.0.1/24")
    a.start_ovsdb()
    add_psk_tunnel(a, "gnv0", "10.231.0.2")
    a.vsctl("add-port", "br-ipsec", "plain0", "--", "set", "interface", "plain0", "type=vxlan",
            "options:remote_ip=10.231.0.3")   # not IPsec: never held
    assert boot_guard(a).returncode == 0
    holds = policies(a, HOLD_PRIORITY)
    assert len(holds) == 1 and "dst 10.231.0.2/32" in holds[0] and "dport 6081" in holds[0], holds
    assert "action block" in holds[0] and "dir out" in holds[0]
    assert boot_guard(a).returncode == 0 and len(policies(a, HOLD_PRIORITY)) == 1   # idempotent
    # No monitor yet: --release keeps the holds (closed, never open) and says why.
    kept = boot_guard(a, "--release", f"--unixctl={a.unixctl}", "--timeout=1")
    assert kept.returncode == 0 and "kept" in kept.stderr and len(policies(a, HOLD_PRIORITY)) == 1
    a.start_charon()
    a.start_monitor()
    released = boot_guard(a, "--release", f"--unixctl={a.unixctl}", "--timeout=30")
    assert released.returncode == 0, released.stderr
    assert policies(a, HOLD_PRIORITY) == []
    assert a.tunnel("gnv0")["state"] in ("loaded", "established")
