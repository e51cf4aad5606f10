"""The plaintext guard on the real kernel (`expect = "guarded"`, GitHub issue "Plaintext guard").

With `other_config:ipsec_skb_mark=0/1` on both hosts the scenario's IPsec tunnel must still work
(the "encrypted" rules), and a second, non-IPsec tunnel between the same hosts must behave as the
guard promises:

* blocked: its packets, not marked by OpenFlow (skb mark bit 0 clear), are dropped by the guard's
  kernel XFRM `block` policies: its ping fails and none of its packets is on the wire;
* marked: once OpenFlow sets pkt_mark=1 on its bridge (the kernel datapath copies pkt_mark to
  the encapsulated skb, and bit 0 set is outside the guard's selector), its ping works again, in
  plaintext on the wire as a non-IPsec tunnel should be.

The non-IPsec tunnel is a VXLAN port `plain` (no psk, default port 4789) on its own bridge
`br-plain` with the overlay 192.0.1.0/24, next to the scenario's tunnel on br-ipsec.
"""

import re
from pathlib import Path

from hosts import Host

MARK = "0/1"
BRIDGE = "br-plain"
PORT = "plain"
TUNNEL = "vxlan"
WIRE = "udp port 4789"                  # the plain tunnel's packets on the underlay
OVERLAY = ("192.0.1.1", "192.0.1.2", 24)
# guard/policy.py GUARD_PRIORITY (0x0F5EC001), as `ip xfrm policy` prints it.
GUARD_PRIORITY = "257867777"
MARK_FLOW = "priority=100,actions=set_field:1->pkt_mark,NORMAL"


def overlay_ip(host: Host) -> str:
    return OVERLAY[0] if host.name == "h1" else OVERLAY[1]


def configure(host: Host, peer: Host) -> None:
    """What the operator types besides the IPsec tunnel: the guard, then the plain tunnel."""
    host.vsctl("set", "Open_vSwitch", ".", f"other_config:ipsec_skb_mark={MARK}")
    host.vsctl("add-br", BRIDGE, "--", "set", "bridge", BRIDGE, "datapath_type=system")
    host.sh.run(["sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.disable_ipv6=1"], netns=host.name)
    host.sh.run(["ip", "addr", "add", f"{overlay_ip(host)}/{OVERLAY[2]}", "dev", BRIDGE], netns=host.name)
    host.sh.run(["ip", "link", "set", BRIDGE, "up"], netns=host.name)
    host.vsctl("add-port", BRIDGE, PORT, "--", "set", "interface", PORT, f"type={TUNNEL}",
               f"options:local_ip={host.ip}", f"options:remote_ip={peer.ip}")


def guard_policies(host: Host) -> int:
    """How many of the guard's XFRM policies the kernel of this host holds."""
    cp = host.sh.run(["ip", "xfrm", "policy"], netns=host.name, check=False)
    return sum(1 for line in cp.stdout.splitlines() if f"priority {GUARD_PRIORITY} " in line + " ")


def out_pol_block(host: Host) -> int:
    """XfrmOutPolBlock of the host's netns: packets dropped by an outbound `block` policy."""
    cp = host.sh.run(["cat", "/proc/net/xfrm_stat"], netns=host.name, check=False)
    m = re.search(r"XfrmOutPolBlock\s+(\d+)", cp.stdout)
    return int(m.group(1)) if m else -1


def add_mark_flow(host: Host) -> None:
    host.sh.run(["ovs-ofctl", "add-flow", f"unix:{host.dir}/{BRIDGE}.mgmt", MARK_FLOW],
                netns=host.name, env=host.ovs_env)


def ping(src: Host, dst: Host, out: Path, label: str, count: int) -> tuple:
    """(sent, received) of an overlay ping on the plain tunnel; one unchecked ping first (ARP)."""
    src.sh.run(["ping", "-c", "1", "-W", "3", overlay_ip(dst)], netns=src.name, check=False)
    cp = src.sh.run(["ping", "-c", str(count), "-i", "0.5", "-W", "2", overlay_ip(dst)],
                    netns=src.name, check=False, timeout=30)
    (out / f"ping-plain-{label}.txt").write_text(cp.stdout + cp.stderr)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", cp.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def flows(host: Host) -> str:
    cp = host.sh.run(["ovs-ofctl", "dump-flows", f"unix:{host.dir}/{BRIDGE}.mgmt"],
                     netns=host.name, env=host.ovs_env, check=False)
    dp = host.appctl("ovs-vswitchd", "dpctl/dump-flows", check=False)
    return f"=== {BRIDGE} flows\n{cp.stdout}{cp.stderr}\n=== dpctl/dump-flows\n{dp.stdout}{dp.stderr}"
