"""`ovs-ipsec boot-guard`: no plaintext tunnel packet between power-on and the monitor's first pass.

The kernel's XFRM policies do not survive a reboot, and ovs-vswitchd forwards long before the IKE
daemon and the monitor are up (charon waits for network-online.target; vswitchd comes before
network.target). The `ovs-ipsec-guard.service` oneshot runs this after ovsdb-server and before
ovs-vswitchd, reading the configuration from OVSDB:

* `other_config:ipsec_skb_mark` set: the plaintext guard itself, through its own API
  (PlaintextGuard.enforce), exactly as the monitor will want it; the monitor adopts these policies
  on its first pass (same priority band, same shapes) and keeps them.
* not set: a *boot hold* for every IPsec tunnel in OVSDB: an outbound `block` policy for the
  tunnel's protocol and port to its peer, at HOLD_PRIORITY, just outside the guard's band. The
  monitor never touches it (it is not the guard's), and the IKE daemon's trap and SA policies take
  precedence over it as soon as they exist, so it only ever decides while they are missing.
  `ovs-ipsec boot-guard --release` (ExecStartPost of ovs-ipsec.service) removes the holds once
  the monitor reports every valid tunnel loaded into the IKE daemon; until then (IKE daemon down,
  say) they stay, and an IPsec tunnel stays closed rather than open in plaintext.

Only policies of exactly these shapes and priorities are ever added or removed.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time

from ..errors import OvsIpsecError
from ..guard.enforcer import PlaintextGuard
from ..guard.policy import GuardChanges, GuardPolicy, InstalledPolicy
from ..guard.xfrm import XfrmPolicyInstaller, batch_commands
from ..model import DesiredState, ValidatedState, wire_traffic
from ..validate import CertificateFacts, certificate_paths, validate

# 0x0F5EC100: the first priority past the guard's band (0x0F5EC000-0x0F5EC0FF), so the monitor's
# guard sees a hold as someone else's policy and leaves it alone; still far beyond any priority
# strongSwan or LibreSwan computes, so their policies always decide first.
HOLD_PRIORITY = 0x0F5EC100
DATABASE = "unix:/var/run/openvswitch/db.sock"
# States in which the monitor has handed the tunnel to the IKE daemon (its policies exist).
LOADED_STATES = frozenset({"loaded", "negotiating", "established"})


def add_parser(commands) -> None:
    parser = commands.add_parser("boot-guard", help="install the plaintext guard or boot holds from OVSDB "
                                 "before ovs-vswitchd starts (ovs-ipsec-guard.service)")
    parser.add_argument("database", nargs="?", default=DATABASE, help=f"OVSDB remote (default {DATABASE})")
    parser.add_argument("--release", action="store_true",
                        help="remove the boot holds once the monitor has loaded every valid tunnel")
    parser.add_argument("--unixctl", help="the monitor's control socket (with --release; default: its pidfile)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for OVSDB, or with --release for the monitor (default 60)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    installer = XfrmPolicyInstaller()
    try:
        if args.release:
            return release(installer, args.unixctl, args.timeout)
        return install(installer, read_ovsdb(args.database, args.timeout))
    except OvsIpsecError as exc:
        print(f"ovs-ipsec boot-guard: {exc}", file=sys.stderr)
        return 1


def read_ovsdb(database: str, timeout: float) -> DesiredState:
    """One snapshot of the configuration, through the monitor's own OVSDB reader."""
    import ovs.poller

    from ..ovsdb.reader import OvsdbReader

    deadline = time.monotonic() + timeout
    reader = OvsdbReader(database)
    try:
        while not reader.run():
            if time.monotonic() > deadline:
                raise OvsIpsecError(f"no answer from {database} within {timeout:g} s")
            poller = ovs.poller.Poller()
            reader.wait(poller)
            poller.timer_wait(500)
            poller.block()
        return reader.snapshot()
    finally:
        reader.close()


def validated_state(desired: DesiredState) -> ValidatedState:
    """The configuration as the monitor will validate it (the same inspector and rules)."""
    from ..pki.inspect import CertificateInspector

    inspector = CertificateInspector()
    certs, keys, chains = certificate_paths(desired)
    facts = CertificateFacts(certs={path: inspector.cert(path) for path in certs},
                             keys={path: inspector.key(path) for path in keys},
                             chains={pair: inspector.verify_chain(*pair) for pair in chains})
    return validate(desired, facts, time.time())


def hold_policies(tunnels) -> frozenset[GuardPolicy]:
    """One outbound block per IPsec tunnel's peer, protocol and port."""
    holds = set()
    for tunnel in tunnels:
        protocol, port = wire_traffic(tunnel.type, tunnel.dst_port)
        peer = str(ipaddress.ip_network(tunnel.remote_ip))
        anywhere = "0.0.0.0/0" if tunnel.family == 4 else "::/0"
        holds.add(GuardPolicy("out", anywhere, peer, protocol, port, None, priority=HOLD_PRIORITY))
    return frozenset(holds)


def installed_holds(installed: tuple[InstalledPolicy, ...]) -> tuple[InstalledPolicy, ...]:
    return tuple(p for p in installed if p.priority == HOLD_PRIORITY and p.as_guard_policy() is not None
                 and p.direction == "out" and p.mark is None)


def install(installer: XfrmPolicyInstaller, desired: DesiredState) -> int:
    validated = validated_state(desired)
    tunnels = validated.tunnels
    installed = installer.policies()
    stale = installed_holds(installed)   # from before a crash: recomputed from scratch
    if validated.guard.error:
        # A malformed mark gives no guard to install: fall back to holds, which keep every IPsec
        # tunnel closed until the monitor has it in the IKE daemon.
        print(f"ovs-ipsec boot-guard: {validated.guard.error}; boot holds instead", file=sys.stderr)
    if validated.guard.mark is not None:
        guard = PlaintextGuard(installer)
        guard.enforce(validated.guard, tunnels, full=True)
        installer.run_batch(batch_commands(GuardChanges(remove=stale), installed))
        print(f"ovs-ipsec boot-guard: plaintext guard {guard.status.mode}: "
              f"{guard.status.installed} XFRM policies in place")
        if guard.status.error:
            print(f"ovs-ipsec boot-guard: {guard.status.error}", file=sys.stderr)
            return 1
        return 0
    holds = hold_policies(tunnels)
    keep = {p.as_guard_policy() for p in stale}
    changes = GuardChanges(add=tuple(sorted(holds - keep)),
                           remove=tuple(p for p in stale if p.as_guard_policy() not in holds))
    installer.run_batch(batch_commands(changes, installed))
    print(f"ovs-ipsec boot-guard: no ipsec_skb_mark; {len(holds)} boot hold(s) for {len(tunnels)} IPsec tunnel(s)")
    return 0


def release(installer: XfrmPolicyInstaller, unixctl: str | None, timeout: float) -> int:
    """Remove the holds once every valid tunnel is in the IKE daemon; keep them if that never happens."""
    from .main import default_unixctl_path, query_status

    if not installed_holds(installer.policies()):
        return 0   # no reboot hold in place (the usual restart): nothing to wait for
    deadline = time.monotonic() + timeout
    waiting: list[str] = []
    while True:
        try:
            status = query_status(unixctl or default_unixctl_path(), timeout=10)
            waiting = [t["name"] for t in status.get("tunnels", [])
                       if t.get("state") not in LOADED_STATES and t.get("state") != "invalid"]
            if not waiting:
                break
        except OvsIpsecError as exc:
            waiting = [str(exc)]
        if time.monotonic() > deadline:
            print(f"ovs-ipsec boot-guard: boot holds kept, not loaded after {timeout:g} s: {', '.join(waiting)}",
                  file=sys.stderr)
            return 0   # the monitor itself is fine; the holds keep those tunnels closed, not open
        time.sleep(0.5)
    installed = installer.policies()
    holds = installed_holds(installed)
    if holds:
        installer.run_batch(batch_commands(GuardChanges(remove=holds), installed))
        print(f"ovs-ipsec boot-guard: {len(holds)} boot hold(s) released")
    return 0
