"""`make demo-ovn`: OVN IPsec across a full mesh of chassis, from `ipsec=true` to `ipsec=false`.

An OVN central (NB and SB ovsdb-servers, ovn-northd) and three chassis, each a network namespace
with its own Open_vSwitch ovsdb-server, ovn-controller, charon and ovs-ipsec monitor, with
certificates from `ovs-ipsec pki` (CN = chassis name). A fourth chassis joins later. Everything
is torn down at the end.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testsupport.ovn import OvnCluster, ovn_missing
from testsupport.procs import wait_for
from testsupport.sandbox import Sandbox

SUBNET = "10.235.0"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(argv: list[str]) -> str:
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    output = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
    print(output, end="", flush=True)
    return output


def status_table(chassis) -> None:
    show([sys.executable, "-m", "ovs_ipsec.cli.main", "status", f"--unixctl={chassis.host.unixctl}"])


def wait_full_mesh(cluster: OvnCluster, started: float) -> float:
    """Seconds from `started` until every chassis has an established tunnel to every other."""
    def ready() -> bool:
        for one in cluster.chassis:
            up = {t["remote_name"] for t in one.host.status()["tunnels"] if t["ike_sas"] > 0}
            if up != {other.name for other in cluster.chassis if other is not one}:
                return False
        return True
    wait_for(ready, 60, interval=0.3, what="an established IKE SA between every pair of chassis")
    return time.monotonic() - started


def main() -> int:
    missing = ovn_missing()
    if missing:
        print(f"demo-ovn: {missing}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="oiovn-"))
    with Sandbox("oiovn", workdir) as sandbox:
        cluster = OvnCluster(sandbox)
        try:
            run(cluster)
        finally:
            cluster.close()
        say("Tearing everything down")
    print("done: every daemon stopped and every namespace removed")
    print("(this kernel has no ESP, so the IKE SAs are what come up here; `make lab` proves ESP on the wire)")
    return 0


def run(cluster: OvnCluster) -> None:
    central = cluster.central
    say("An OVN central and three chassis: ovsdb-server, ovn-controller, charon, ovs-ipsec monitor each")
    for index in (1, 2, 3):
        chassis = cluster.add_chassis(f"ch{index}", f"{SUBNET}.{index}/24")
        print(f"  {chassis.name}: namespace {chassis.host.name}, encap IP {chassis.encap_ip}, "
              f"certificate CN={chassis.name} signed by our CA")
    cluster.wait_for_tunnels(ipsec=False)
    show(["ovn-sbctl", f"--db={central.sb_db}", "show"])

    say("Turn IPsec on for the whole deployment, with one command")
    started = time.monotonic()
    show(["ovn-nbctl", f"--db={central.nb_db}", "set", "nb_global", ".", "ipsec=true"])
    cluster.wait_for_tunnels(ipsec=True)
    print(f"  every pair established {wait_full_mesh(cluster, started):.1f} s after the command")
    for chassis in cluster.chassis:
        say(f"ovs-ipsec status on {chassis.name}")
        status_table(chassis)

    first = cluster.chassis[0]
    say(f"The status, written back to each tunnel's Interface row on {first.name} (external_ids)")
    show(["ovs-vsctl", f"--db={first.host.db}", "--columns=name,options,external_ids", "list", "Interface",
          *sorted(first.ovn_tunnels())])

    say(f"Metrics on {first.name} (also served over HTTP with --metrics-address HOST:PORT)")
    metrics = first.host.appctl("metrics/show")
    print("\n".join(line for line in metrics.splitlines()
                    if line.startswith(("ovs_ipsec_tunnel_state{", "ovs_ipsec_tunnel_ike_sas", "ovs_ipsec_tunnels{",
                                        "ovs_ipsec_certificate_expiry", "ovs_ipsec_reconcile_duration"))
                    and not line.endswith(" 0")))

    say("A fourth chassis joins: only its own tunnels are new, existing IKE SAs stay as they are")
    before = {one.name: ike_sa_ids(one) for one in cluster.chassis}
    started = time.monotonic()
    cluster.add_chassis("ch4", f"{SUBNET}.4/24")
    cluster.wait_for_tunnels(ipsec=True)
    print(f"  full mesh of four established {wait_full_mesh(cluster, started):.1f} s after ch4 started")
    for name, ids in before.items():
        now = ike_sa_ids(next(one for one in cluster.chassis if one.name == name))
        kept = all(now.get(conn) == sa for conn, sa in ids.items())
        print(f"  {name}: existing IKE SAs {'unchanged' if kept else 'CHANGED'} ({', '.join(sorted(ids.values()))})")
    status_table(first)

    say("Forced UDP encapsulation (NAT traversal), from the northbound database")
    started = time.monotonic()
    show(["ovn-nbctl", f"--db={central.nb_db}", "set", "nb_global", ".", "options:ipsec_encapsulation=true"])
    wait_for(lambda: all(row["options"].get("ipsec_encapsulation") == "yes"
                         for one in cluster.chassis for row in one.ovn_tunnels().values()), 30,
             what="ipsec_encapsulation=yes on every tunnel")
    print(f"  every pair re-established {wait_full_mesh(cluster, started):.1f} s after the command")
    for event in first.host.vici().list_sas():
        for name, sa in event.items():
            print(f"  {first.name}: {name} "
                  f"{sa['local-host'].decode()}:{sa['local-port'].decode()} -> "
                  f"{sa['remote-host'].decode()}:{sa['remote-port'].decode()} "
                  f"NAT-T {'forced' if sa.get('nat-any') == b'yes' else 'off'}")

    say("Turn IPsec off: every connection we created goes away")
    show(["ovn-nbctl", f"--db={central.nb_db}", "set", "nb_global", ".", "ipsec=false"])
    cluster.wait_for_tunnels(ipsec=False)
    for chassis in cluster.chassis:
        wait_for(lambda c=chassis: not c.host.status()["tunnels"], 30, what=f"no IPsec tunnel on {chassis.name}")
        conns = [c.decode() for c in chassis.host.vici().get_conns()["conns"]]
        print(f"  {chassis.name}: IPsec tunnels 0, charon connections {len(conns)}")
    status_table(first)

    say(f"The events on {first.name}, one line each (logfmt)")
    for line in first.host.log_text().splitlines():
        if "event=" in line:
            print("  " + line[:19] + " " + line[line.index("event="):])


def ike_sa_ids(chassis) -> dict[str, str]:
    return {name: sa["uniqueid"].decode() for event in chassis.host.vici().list_sas() for name, sa in event.items()}


if __name__ == "__main__":
    sys.exit(main())
