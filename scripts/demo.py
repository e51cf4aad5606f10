"""`make demo`: two hosts in network namespaces, a Geneve tunnel with a PSK, its IKE SA up on both sides.

Each host runs its own ovsdb-server, charon and ovs-ipsec monitor. The tunnel is configured with
plain ovs-vsctl exactly as the OVS IPsec documentation shows; everything is torn down at the end.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testsupport.sandbox import Sandbox

HOSTS = (("west", "10.231.10.1/24"), ("east", "10.231.10.2/24"))


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(argv: list[str], env=None) -> str:
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    output = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    print(output, end="", flush=True)
    return output


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ovs-ipsec-demo-"))
    with Sandbox("oidemo", workdir) as sandbox:
        say("Two hosts, each with its own ovsdb-server, charon and ovs-ipsec monitor")
        hosts = [sandbox.add_host(name, address) for name, address in HOSTS]
        for host in hosts:
            host.start_ovsdb()
            host.start_charon()
            host.start_monitor()
            print(f"  {host.name}: underlay {host.address}, OVSDB {host.db}, VICI {host.vici_path}")

        say("Add a Geneve tunnel with a pre-shared key on both sides, with plain ovs-vsctl")
        for host, peer in (hosts, hosts[::-1]):
            show(["ovs-vsctl", f"--db={host.db}", "--no-wait", "add-port", "br-ipsec", "tun", "--",
                  "set", "interface", "tun", "type=geneve", f"options:local_ip={host.address}",
                  f"options:remote_ip={peer.address}", "options:psk=swordfish"])

        say("Wait until both monitors report the tunnel's IKE SA up")
        started = time.monotonic()
        for host in hosts:
            host.wait_ike_up("tun", timeout=60)
        print(f"  IKE SA up on both sides after {time.monotonic() - started:.1f} s. The state reads "
              "'negotiating' here: this machine's kernel has no ESP, so the child SAs that would encrypt "
              "the tunnel cannot be installed. The real-kernel lab (make lab) shows them 'established'.")

        for host in hosts:
            say(f"ovs-ipsec status on {host.name}")
            show([sys.executable, "-m", "ovs_ipsec.cli.main", "status", f"--unixctl={host.unixctl}"])
        say("ovs-appctl tunnels/show on west (upstream's layout; the PSK is never printed)")
        show(["ovs-appctl", "-t", hosts[0].unixctl, "tunnels/show"])

        say("Tearing everything down")
    print("done: every daemon stopped and every namespace removed")
    print("(this kernel has no ESP, so the IKE SA is what comes up here; `make lab` proves ESP on the wire)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
