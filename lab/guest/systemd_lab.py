"""Scenarios on hosts that boot systemd as PID 1 (host = "systemd" in scenarios.toml; issue #15).

Two systemd-nspawn machines (guest/machines.py) run Debian's own units: ovsdb-server,
ovs-vswitchd, strongswan (charon-systemd) or strongswan-starter, openvswitch-ipsec (upstream's
monitor) or our .deb's ovs-ipsec.service and ovs-ipsec-guard.service. The operator only types
ovs-vsctl, apt, systemctl and ovs-ipsec commands inside them. Judged from outside: a capture on the
wire bridge from before the first boot (every tunnel packet in plaintext counts: `plaintext`),
pings across the tunnel at 10 per second (`ping_lost`, `outage_seconds`: the longest run of lost
replies), and the kernel's SA SPIs.

expect = "lifecycle"  both hosts installed with our .deb: install+start, restart ovs-ipsec (same
                      SPIs and IKE SA ids), restart strongswan (repaired), logrotate
expect = "upgrade"    both hosts on Debian's openvswitch-ipsec with a live tunnel; h1 installs our
                      .deb with apt and runs `ovs-ipsec migrate-from-upstream` while pinging; h2
                      stays on upstream (mixed cluster); then --rollback if the scenario asks
expect = "reboot"     both hosts ours; h1 (which pings h2 from its own boot on) is power-cycled
                      while h2 pings it: no plaintext from power-on, boot to encrypted seconds
"""

from __future__ import annotations

import json
import re
import shutil
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machines import Machine, prepare_vm
from proc import Shell, stop_pid, wait_for
from scenario import Scenario

PSK = "swordfish"
PING_INTERVAL = 0.1
ESP = "ip proto 50"
GUARD_PRIORITY = "257867777"
HOLD_PRIORITY = "257868032"
# The operator's network configuration of each host: the overlay address on br-ipsec once
# ovs-vswitchd has made it, and (h1) traffic to the peer from boot on, so that a packet leaving in
# plaintext at boot would be on the wire.
OVERLAY_UNIT = """[Unit]
Description=lab: overlay address on br-ipsec (the operator's network configuration)
After=ovs-vswitchd.service
Wants=ovs-vswitchd.service
[Service]
# Not a oneshot: the boot must not wait for br-ipsec, which exists only once a tunnel is configured.
Type=exec
ExecStart=/bin/sh -c 'while ! ip link show br-ipsec >/dev/null 2>&1; do sleep 0.2; done; for i in $$(seq 1200); do ip link show br-ipsec >/dev/null 2>&1 && break; sleep 0.1; done; \\
  sysctl -qw net.ipv6.conf.br-ipsec.disable_ipv6=1; ip addr replace {ip}/24 dev br-ipsec; ip link set br-ipsec up'
[Install]
WantedBy=multi-user.target
"""
PINGER_UNIT = """[Unit]
Description=lab: traffic to the peer across the tunnel from boot on
After=lab-overlay.service
Wants=lab-overlay.service
[Service]
ExecStart=/bin/ping -D -n -i 0.2 -W 1 {peer}
# ping gives up at once while the overlay address is not there yet.
Restart=always
RestartSec=0.5
StandardOutput=append:/var/log/lab-ping.log
[Install]
WantedBy=multi-user.target
"""

EXPECTATIONS = {
    "lifecycle": lambda r: all(p.get("pass") for p in r["phases"].values()) and len(r["phases"]) >= 4,
    "upgrade": lambda r: all(p.get("pass") for p in r["phases"].values()) and "migrate" in r["phases"],
    "reboot": lambda r: all(p.get("pass") for p in r["phases"].values()) and "reboot" in r["phases"],
}


def say(msg: str) -> None:
    print(f"LAB: {msg}", flush=True)


class Wire:
    """tcpdump on the wire bridge (VM namespace): every packet between the two hosts."""

    def __init__(self, sh: Shell, pcap: Path, tunnel_filter: str):
        self.sh, self.pcap, self.filter = sh, pcap, tunnel_filter
        self.proc = None

    def start(self) -> None:
        log = self.pcap.with_suffix(".tcpdump.out")
        self.proc = self.sh.spawn(["tcpdump", "-i", "wire", "-n", "-U", "-w", self.pcap], log=log)
        if not wait_for(lambda: "listening on" in log.read_text(), timeout=20):
            raise RuntimeError(f"tcpdump on the wire did not start: {log.read_text()}")

    def count(self, expression: str) -> int:
        cp = self.sh.run(["tcpdump", "-n", "-r", self.pcap, expression], check=False, quiet=True)
        return len(cp.stdout.splitlines())

    def plaintext(self) -> int:
        return self.count(self.filter)

    def esp(self) -> int:
        return self.count(ESP)

    def stop(self) -> None:
        if self.proc:
            stop_pid(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=10)
            self.proc = None


class Pinger:
    """ping -D across the tunnel from a host's namespace, 10 per second, in the background."""

    def __init__(self, sh: Shell, netns: str, target: str, out: Path):
        self.sh, self.netns, self.target, self.out = sh, netns, target, out
        self.proc = None

    def start(self) -> None:
        self.proc = self.sh.spawn(["ping", "-D", "-n", "-i", str(PING_INTERVAL), "-W", "1", self.target],
                                  netns=self.netns, log=self.out)

    def stop(self) -> dict:
        stop_pid(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=10)
        return ping_figures(self.out.read_text())


def ping_figures(text: str, since: float = 0.0) -> dict:
    """sent, received, lost, and the longest run of lost replies as seconds (replies by icmp_seq)."""
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    seqs = sorted({int(s) for s in re.findall(r"icmp_seq=(\d+) ttl", text)})
    gap = 0
    if seqs:
        gap = max([seqs[0] - 1, sent - seqs[-1]] + [b - a - 1 for a, b in zip(seqs, seqs[1:])])
    first_reply = None
    for stamp, _ in re.findall(r"^\[(\d+\.\d+)\] .*icmp_seq=(\d+) ttl", text, re.M):
        if float(stamp) >= since:
            first_reply = float(stamp)
            break
    return {"ping_sent": sent, "ping_received": received, "ping_lost": sent - received,
            "outage_seconds": round(gap * PING_INTERVAL, 1), "first_reply_at": first_reply}


# -- the hosts' configuration, as the operator types it ---------------------------------------------

def prepare_disk(m: Machine, peer: Machine, pinger: bool) -> None:
    """Before the first boot: the operator's network configuration (and h1's boot-time traffic)."""
    units = m.root / "etc/systemd/system"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (units / "lab-overlay.service").write_text(OVERLAY_UNIT.format(ip=m.overlay_ip))
    (wants / "lab-overlay.service").symlink_to("../lab-overlay.service")
    if pinger:
        (units / "lab-ping.service").write_text(PINGER_UNIT.format(peer=peer.overlay_ip))
        (wants / "lab-ping.service").symlink_to("../lab-ping.service")


def configure_tunnel(sc: Scenario, m: Machine, peer: Machine, certs: dict | None) -> None:
    if sc.skb_mark:
        m.vsctl("set", "Open_vSwitch", ".", f"other_config:ipsec_skb_mark={sc.skb_mark}")
    m.vsctl("--may-exist", "add-br", "br-ipsec", "--", "set", "bridge", "br-ipsec", "datapath_type=system")
    # As the netns scenarios do (hosts.py): no IPv6 autoconfiguration traffic on the overlay, which
    # would reach the tunnel port the moment it exists, before any IKE daemon could hold it (without
    # ipsec_skb_mark nothing does: the README's "no guard" row). The only overlay traffic is ours.
    m.sh.run(["sysctl", "-qw", "net.ipv6.conf.br-ipsec.disable_ipv6=1"], netns=m.name)
    options = [f"options:local_ip={m.ip}", f"options:remote_ip={peer.ip}"]
    if sc.auth == "psk":
        options.append(f"options:psk={PSK}")
    else:
        own = certs[m.name]
        settings = [f"other_config:certificate={own['cert']}", f"other_config:private_key={own['key']}"]
        if sc.auth == "ca":
            settings.append(f"other_config:ca_cert={own['ca']}")
            options.append(f"options:remote_name={peer.name}")
        else:
            options.append(f"options:remote_cert={own['peer_cert']}")
        m.vsctl("set", "Open_vSwitch", ".", *settings)
    options += [f"options:{k}={v}" for k, v in sc.options.items()]
    m.vsctl("add-port", "br-ipsec", "tun", "--", "set", "interface", "tun", f"type={sc.tunnel}", *options)
    # The overlay address now that br-ipsec exists (lab-overlay.service does it at every later boot).
    m.run("systemctl", "restart", "lab-overlay.service")
    if not wait_for(lambda: m.overlay_ip in m.sh.run(["ip", "-br", "addr", "show", "br-ipsec"], netns=m.name,
                                                      check=False, quiet=True).stdout, 60):
        raise RuntimeError(f"{m.name}: no {m.overlay_ip} on br-ipsec (lab-overlay.service)")


def make_certs(sc: Scenario, sh: Shell, machines: list, work: Path) -> dict | None:
    """Certificates made with Debian's ovs-pki, as upstream's tutorial does (RSA), copied into each
    machine: its key (0600) and certificate, plus the peer's certificate or the CA's; for
    upstream's strongSwan the CA also goes to /etc/ipsec.d/cacerts, as the tutorial says."""
    if sc.auth == "psk":
        return None
    pki = work / "pki"
    shutil.rmtree(pki, ignore_errors=True)
    pki.mkdir(parents=True)
    if sc.auth == "ca":
        sh.run(["ovs-pki", f"--dir={pki}/ca", "init", "--force"], cwd=pki, timeout=300)
    for m in machines:
        sh.run(["ovs-pki", f"--dir={pki}/ca", "req", "-u", m.name], cwd=pki, timeout=300)
        if sc.auth == "ca":
            sh.run(["ovs-pki", f"--dir={pki}/ca", "-b", "sign", m.name, "switch"], cwd=pki, timeout=300)
        else:
            sh.run(["ovs-pki", f"--dir={pki}/ca", "self-sign", m.name], cwd=pki, timeout=300)
    certs = {}
    for m in machines:
        peer = next(p for p in machines if p is not m)
        d = "/etc/ipsec.d"
        m.copy_in(pki / f"{m.name}-cert.pem", f"{d}/certs/{m.name}-cert.pem")
        m.copy_in(pki / f"{m.name}-privkey.pem", f"{d}/private/{m.name}-privkey.pem", mode=0o600)
        entry = {"cert": f"{d}/certs/{m.name}-cert.pem", "key": f"{d}/private/{m.name}-privkey.pem"}
        if sc.auth == "ca":
            m.copy_in(pki / "ca/switchca/cacert.pem", f"{d}/cacerts/cacert.pem")
            entry["ca"] = f"{d}/cacerts/cacert.pem"
        else:
            m.copy_in(pki / f"{peer.name}-cert.pem", f"{d}/certs/{peer.name}-cert.pem")
            entry["peer_cert"] = f"{d}/certs/{peer.name}-cert.pem"
        certs[m.name] = entry
        if (m.root / "usr/sbin/ipsec").exists() and m.leader() is not None:
            # Upstream's charon (strongswan-starter) reads /etc/ipsec.d/cacerts when it starts; the
            # operator who adds a CA to a running host tells it so.
            m.run("ipsec", "rereadcacerts", check=False)
    return certs


# -- what the hosts say ------------------------------------------------------------------------------

def our_status(m: Machine) -> dict:
    """`ovs-appctl -t ovs-monitor-ipsec tunnels/show --json`: no flags, as an operator types it."""
    cp = m.run("ovs-appctl", "-t", "ovs-monitor-ipsec", "tunnels/show", "--json", check=False, quiet=True,
               timeout=20)
    try:
        return json.loads(cp.stdout) if cp.returncode == 0 else {}
    except ValueError:
        return {}


def ours_established(m: Machine) -> bool:
    tunnels = our_status(m).get("tunnels", [])
    return bool(tunnels) and all(t.get("state") == "established" and t.get("child_sas") for t in tunnels
                                 if t.get("state") != "invalid")


def kernel_spis(m: Machine) -> list[str]:
    cp = m.sh.run(["ip", "xfrm", "state"], netns=m.name, check=False, quiet=True)
    return sorted(re.findall(r"spi (0x[0-9a-f]+)", cp.stdout))


def ike_sa_ids(m: Machine) -> list[str]:
    """charon's IKE SAs of ours: name and unique id (a re-keyed or renegotiated SA gets a new id)."""
    cp = m.run("swanctl", "--list-sas", "--raw", check=False, quiet=True)
    return sorted(f"{name}#{uid}" for name, uid in re.findall(r"(ovsipsec-[^ {]+) \{uniqueid=(\d+)", cp.stdout))


def sas_up(m: Machine) -> bool:
    return len(kernel_spis(m)) >= 2


def policies(m: Machine, priority: str) -> int:
    cp = m.sh.run(["ip", "xfrm", "policy"], netns=m.name, check=False, quiet=True)
    return sum(1 for line in cp.stdout.splitlines() if f"priority {priority} " in line + " ")


def policies_any(m: Machine) -> int:
    """XFRM policies with a template (an IKE daemon's, trap or SA), in the host's kernel."""
    cp = m.sh.run(["ip", "xfrm", "policy"], netns=m.name, check=False, quiet=True)
    return cp.stdout.count("tmpl ")


def unit_states(m: Machine, *units: str) -> dict:
    cp = m.run("systemctl", "is-active", *units, check=False, quiet=True)
    return dict(zip(units, cp.stdout.split(), strict=False))


def processes(m: Machine) -> list[str]:
    cp = m.run("ps", "-e", "-o", "comm=", check=False, quiet=True)
    return cp.stdout.split()


def security_score(m: Machine, unit: str) -> float | None:
    cp = m.run("systemd-analyze", "security", "--no-pager", unit, check=False, timeout=120)
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", cp.stdout + cp.stderr)
    return float(found.group(1)) if found else None


def parallel(fn, items) -> list:
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


# -- phases -----------------------------------------------------------------------------------------

def phase_install_start(lab: Lab) -> dict:
    h1, h2 = lab.machines
    units = parallel(lambda m: unit_states(m, "ovsdb-server", "ovs-vswitchd", "strongswan", "ovs-ipsec",
                                           "ovs-ipsec-guard"), lab.machines)
    score = security_score(h1, "ovs-ipsec.service")
    lab.configure()
    established = wait_for(lambda: all(parallel(ours_established, lab.machines)), 90, interval=1.0)
    status = h1.run("ovs-ipsec", "status", "--json", check=False, timeout=60)   # no flags, as typed
    figures = lab.ping_burst(h1, h2)
    log = h1.root / "var/log/openvswitch/ovs-monitor-ipsec.log"
    log_mode = oct(log.stat().st_mode & 0o777) if log.exists() else None
    secret_seen = PSK in log.read_text(errors="replace") + status.stdout if log.exists() else True
    result = {"units": units, "security_score": score, "established": established,
              "status_cli_ok": status.returncode == 0 and '"established"' in status.stdout,
              "log_mode": log_mode, "psk_in_log_or_status": secret_seen, **figures,
              "plaintext": lab.wire.plaintext(), "esp": lab.wire.esp()}
    result["pass"] = (all(s == "active" for u in units for s in u.values()) and score is not None and score <= 5.0
                      and established and result["status_cli_ok"] and log_mode == "0o600" and not secret_seen
                      and figures["ping_received"] > 0 and result["plaintext"] == 0 and result["esp"] > 0)
    return result


def phase_restart_ovs_ipsec(lab: Lab) -> dict:
    h1, h2 = lab.machines
    before = {"spis": kernel_spis(h1), "ike": ike_sa_ids(h1)}
    plain0 = lab.wire.plaintext()
    pinger = lab.pinger(h1, h2, "restart-ovs-ipsec")
    t = time.monotonic()
    h1.run("systemctl", "restart", "ovs-ipsec.service", timeout=180)
    seconds = round(time.monotonic() - t, 1)
    back = wait_for(lambda: ours_established(h1), 60, interval=1.0)
    time.sleep(2)
    figures = pinger.stop()
    after = {"spis": kernel_spis(h1), "ike": ike_sa_ids(h1)}
    result = {"restart_seconds": seconds, "established": back, "spis_before": before["spis"],
              "spis_after": after["spis"], "ike_sas_before": before["ike"], "ike_sas_after": after["ike"],
              "same_sas": before == after and bool(before["spis"]), **figures,
              "plaintext": lab.wire.plaintext() - plain0}
    result["pass"] = back and result["same_sas"] and figures["ping_lost"] == 0 and result["plaintext"] == 0
    return result


def phase_restart_strongswan(lab: Lab) -> dict:
    h1, h2 = lab.machines
    before = kernel_spis(h1)
    plain0 = lab.wire.plaintext()
    pinger = lab.pinger(h1, h2, "restart-strongswan")
    t = time.monotonic()
    h1.run("systemctl", "restart", "strongswan.service", timeout=180)
    repaired = wait_for(lambda: ours_established(h1) and ours_established(h2), 90, interval=0.5)
    seconds = round(time.monotonic() - t, 1)
    time.sleep(2)
    figures = pinger.stop()
    result = {"repaired": repaired, "repair_seconds": seconds, "spis_before": before, "spis_after": kernel_spis(h1),
              **figures, "plaintext": lab.wire.plaintext() - plain0}
    # Repaired: new SAs, traffic flows again, and nothing in plaintext meanwhile (ovs-ipsec.service is
    # PartOf strongswan.service: it stops first and leaves holds in place until it has reloaded).
    result["pass"] = (repaired and result["spis_after"] != before and figures["ping_received"] > 0
                      and result["plaintext"] == 0)
    return result


def phase_logrotate(lab: Lab) -> dict:
    h1 = lab.machines[0]
    dry = h1.run("logrotate", "-d", "/etc/logrotate.conf", check=False, timeout=60)
    errors = [line for line in (dry.stdout + dry.stderr).splitlines() if line.startswith("error")]
    forced = h1.run("logrotate", "-f", "/etc/logrotate.conf", check=False, timeout=60)
    logdir = h1.root / "var/log/openvswitch"
    rotated = sorted(p.name for p in logdir.glob("ovs-monitor-ipsec.log.*"))
    # /run is the machine's own tmpfs: read the pidfile from inside.
    pid = h1.run("cat", "/run/openvswitch/ovs-monitor-ipsec.pid", check=False, quiet=True).stdout.strip()
    fds = h1.run("sh", "-c", f"ls -l /proc/{pid}/fd | grep -F /var/log/openvswitch/", check=False) if pid else None
    # After rotation the monitor writes to the new file (vlog/reopen from Open vSwitch's rule).
    reopened = bool(fds) and any(line.endswith("/var/log/openvswitch/ovs-monitor-ipsec.log")
                                 for line in fds.stdout.splitlines())
    result = {"dry_run_errors": errors, "forced_rc": forced.returncode, "rotated": rotated, "reopened": reopened,
              "open_files": fds.stdout.strip().splitlines() if fds else []}
    result["pass"] = not errors and forced.returncode == 0 and bool(rotated) and reopened
    return result


def phase_ovsdb_late(lab: Lab) -> dict:
    """ovs-ipsec.service starting while OVSDB is not there yet (as at a boot where ovsdb-server is
    slow): the start fails, loudly (journal), and is retried every 5 s without ever hitting the
    start limit; once ovsdb-server is up the monitor runs and the tunnel is established again."""
    h1 = lab.machines[0]
    h1.run("systemctl", "stop", "ovs-ipsec.service", "ovs-vswitchd.service", "ovsdb-server.service", timeout=180)
    h1.run("systemctl", "mask", "--runtime", "ovsdb-server.service")   # nothing may start it for now
    h1.run("systemctl", "start", "--no-block", "ovs-ipsec.service")
    time.sleep(40)   # a failed start, its ExecStopPost and RestartSec=5: about 15 s a round under TCG
    during = h1.run("systemctl", "show", "-p", "NRestarts", "-p", "ActiveState", "-p", "Result", "ovs-ipsec.service",
                    check=False).stdout
    h1.run("systemctl", "unmask", "--runtime", "ovsdb-server.service")
    t = time.monotonic()
    h1.run("systemctl", "start", "ovsdb-server.service", "ovs-vswitchd.service", timeout=180)
    back = wait_for(lambda: ours_established(h1), 90, interval=1.0)
    journal = h1.run("journalctl", "--no-pager", "-u", "ovs-ipsec.service", check=False, timeout=60).stdout
    fields = dict(line.split("=", 1) for line in during.split() if "=" in line)
    result = {"while_ovsdb_down": fields, "restarts": int(fields.get("NRestarts", "0") or 0),
              "fatal_in_journal": "cannot read the Open_vSwitch schema" in journal,
              "start_limit_hit": "start-limit" in during + journal,
              "established_after_ovsdb_seconds": round(time.monotonic() - t, 1) if back else None}
    result["pass"] = (result["restarts"] >= 2 and not result["start_limit_hit"] and result["fatal_in_journal"]
                      and back and unit_states(h1, "ovs-ipsec")["ovs-ipsec"] == "active")
    return result


def phase_migrate(lab: Lab, sc: Scenario) -> dict:
    """h1: apt install ./ovs-ipsec_*.deb, then ovs-ipsec migrate-from-upstream, with traffic."""
    h1, h2 = lab.machines
    plain0, esp0 = lab.wire.plaintext(), lab.wire.esp()
    spis_before = kernel_spis(h1)
    pinger = lab.pinger(h1, h2, "migrate")
    time.sleep(1)
    t = time.monotonic()
    debs = sorted(f"/root/debs/{p.name}" for p in (h1.root / "root/debs").glob("*.deb"))
    install = h1.run("apt-get", "install", "-y", "-q", "--no-install-recommends", *debs, check=False, timeout=600,
                     log=lab.out / "h1-apt-install.txt")
    install_seconds = round(time.monotonic() - t, 1)
    after_install = {"units": unit_states(h1, "openvswitch-ipsec", "strongswan", "strongswan-starter", "ovs-ipsec"),
                     "charons": [p for p in processes(h1) if p.startswith("charon")]}
    t = time.monotonic()
    migrate = h1.run("ovs-ipsec", "migrate-from-upstream", check=False, timeout=300,
                     log=lab.out / "h1-migrate.txt")
    migrate_seconds = round(time.monotonic() - t, 1)
    time.sleep(3)
    figures = pinger.stop()
    masked = h1.run("systemctl", "is-enabled", "openvswitch-ipsec.service", "strongswan-starter.service",
                    check=False, quiet=True).stdout.split()
    leftovers = {path: h1.read(path)[:80] for path in ("/etc/ipsec.conf", "/etc/ipsec.secrets",
                                                       "/etc/strongswan.d/ovs.conf")}
    backup = h1.root / "var/lib/ovs-ipsec/upstream"
    backup_modes = {p.name: oct(p.stat().st_mode & 0o777) for p in backup.glob("*")} if backup.exists() else {}
    result = {"apt_rc": install.returncode, "apt_seconds": install_seconds, "after_apt": after_install,
              "migrate_rc": migrate.returncode, "migrate_seconds": migrate_seconds,
              "units_after": unit_states(h1, "openvswitch-ipsec", "strongswan-starter", "strongswan", "ovs-ipsec"),
              "masked": masked, "leftovers": leftovers, "backup_modes": backup_modes,
              "charons_after": [p for p in processes(h1) if p.startswith("charon") or p == "starter"],
              "spis_before": spis_before, "spis_after": kernel_spis(h1), "h1_established": ours_established(h1),
              "peer_upstream_active": unit_states(h2, "openvswitch-ipsec")["openvswitch-ipsec"],
              "holds_left": policies(h1, HOLD_PRIORITY),
              **figures, "plaintext": lab.wire.plaintext() - plain0, "esp": lab.wire.esp() - esp0}
    stubbed = (leftovers["/etc/ipsec.conf"].startswith("# ovs-ipsec") and not leftovers["/etc/strongswan.d/ovs.conf"]
               and "PSK" not in leftovers["/etc/ipsec.secrets"])
    result["pass"] = (install.returncode == 0 and after_install["charons"].count("charon-systemd") == 0
                      and after_install["units"].get("ovs-ipsec") != "active"
                      and migrate.returncode == 0 and masked == ["masked", "masked"] and stubbed
                      and all(m == "0o600" for m in backup_modes.values()) and backup_modes
                      and result["charons_after"] == ["charon-systemd"] and result["h1_established"]
                      and result["peer_upstream_active"] == "active" and result["holds_left"] == 0
                      and figures["outage_seconds"] <= 1.0 and result["plaintext"] == 0 and result["esp"] > 0)
    return result


def phase_rollback(lab: Lab) -> dict:
    """h1 back to Debian's openvswitch-ipsec with `--rollback`, with traffic."""
    h1, h2 = lab.machines
    plain0 = lab.wire.plaintext()
    pinger = lab.pinger(h1, h2, "rollback")
    time.sleep(1)
    t = time.monotonic()
    rollback = h1.run("ovs-ipsec", "migrate-from-upstream", "--rollback", check=False, timeout=300,
                      log=lab.out / "h1-rollback.txt")
    rollback_seconds = round(time.monotonic() - t, 1)
    # Upstream's charon brings each direction up on its own acquire: wait for a reply again.
    back = wait_for(lambda: lab.sh.run(["ping", "-c", "1", "-W", "1", h2.overlay_ip], netns=h1.name, check=False,
                                       quiet=True).returncode == 0, 90, interval=0.5)
    back_seconds = round(time.monotonic() - t, 1)
    time.sleep(3)
    figures = pinger.stop()
    result = {"rollback_rc": rollback.returncode, "rollback_seconds": rollback_seconds, "traffic_back": back,
              "traffic_back_seconds": back_seconds,
              "units": unit_states(h1, "openvswitch-ipsec", "strongswan", "ovs-ipsec"),
              "charons": [p for p in processes(h1) if p.startswith("charon") or p == "starter"],
              "holds_left": policies(h1, HOLD_PRIORITY), **figures, "plaintext": lab.wire.plaintext() - plain0}
    result["pass"] = (rollback.returncode == 0 and back and result["plaintext"] == 0
                      and result["units"]["openvswitch-ipsec"] == "active" and result["units"]["ovs-ipsec"] != "active"
                      and "charon-systemd" not in result["charons"] and "charon" in result["charons"]
                      and result["holds_left"] == 0)
    return result


def phase_reboot(lab: Lab, sc: Scenario) -> dict:
    """h1 power-cycles; h2 pings it throughout; h1 pings h2 from its own boot on (lab-ping)."""
    h1, h2 = lab.machines
    plain0, esp0 = lab.wire.plaintext(), lab.wire.esp()
    pinger = lab.pinger(h2, h1, "reboot")
    time.sleep(1)
    t_off = time.monotonic()
    wall_on = None
    h1.shutdown()
    down = round(time.monotonic() - t_off, 1)
    wall_on = time.time()
    t_on = h1.power_on()
    marks = {}

    def watch() -> bool:
        if "guard" not in marks and policies(h1, GUARD_PRIORITY if sc.skb_mark else HOLD_PRIORITY) > 0:
            marks["guard"] = round(time.monotonic() - t_on, 1)
        if "vswitchd" not in marks and h1.sh.run(["ip", "link", "show", "br-ipsec"], netns=h1.name, check=False,
                                                  quiet=True).returncode == 0:
            marks["vswitchd"] = round(time.monotonic() - t_on, 1)
        if "sas" not in marks and sas_up(h1):
            marks["sas"] = round(time.monotonic() - t_on, 1)
        try:
            return "sas" in marks and ours_established(h1)
        except RuntimeError:   # not booted far enough for nsenter yet
            return False

    encrypted = wait_for(watch, 240, interval=0.5)
    boot_to_established = round(time.monotonic() - t_on, 1)
    booted = h1.wait_booted(120)
    time.sleep(3)
    figures = pinger.stop()
    ping_h2 = ping_figures(pinger.out.read_text(), since=wall_on)
    holds_left = policies(h1, HOLD_PRIORITY)
    h1_ping = h1.read("/var/log/lab-ping.log")
    result = {"skb_mark": sc.skb_mark or None, "shutdown_seconds": down, "boot_state": booted,
              "established": encrypted, "boot_to_established_seconds": boot_to_established,
              "boot_to_guard_seconds": marks.get("guard"), "boot_to_br_ipsec_seconds": marks.get("vswitchd"),
              "boot_to_sas_seconds": marks.get("sas"),
              "boot_to_first_reply_seconds": round(ping_h2["first_reply_at"] - wall_on, 1)
              if ping_h2["first_reply_at"] else None,
              "holds_left": holds_left, "h1_boot_pings_sent": len(re.findall(r"icmp_seq=", h1_ping)) + h1_ping.count("no answer"),
              **figures, "plaintext": lab.wire.plaintext() - plain0, "esp": lab.wire.esp() - esp0}
    # The guard (or the holds) must be in the kernel before ovs-vswitchd has made br-ipsec.
    guard_first = marks.get("guard") is not None and marks["guard"] <= (marks.get("vswitchd") or 1e9)
    result["guard_before_vswitchd"] = guard_first
    result["pass"] = encrypted and result["plaintext"] == 0 and result["esp"] > 0 and holds_left == 0 and guard_first
    return result


# -- the scenario -----------------------------------------------------------------------------------

class Lab:
    def __init__(self, sc: Scenario, out: Path, sh: Shell):
        self.sc, self.out, self.sh = sc, out, sh
        tree = "upstream" if sc.expect == "upgrade" else "ovs-ipsec"
        self.machines = [Machine("h1", 1, tree, sh, out), Machine("h2", 2, tree, sh, out)]
        port = {"geneve": "6081", "vxlan": "4789"}.get(sc.tunnel)
        port = sc.options.get("dst_port", port)
        self.wire = Wire(sh, out / "wire.pcap", f"udp port {port}" if port else "ip proto 47")
        self.certs = None

    def configure(self) -> None:
        h1, h2 = self.machines
        self.certs = make_certs(self.sc, self.sh, self.machines, Path("/tmp/lab-sd") / self.sc.name)
        parallel(lambda pair: configure_tunnel(self.sc, *pair, self.certs), [(h1, h2), (h2, h1)])

    def pinger(self, src: Machine, dst: Machine, label: str) -> Pinger:
        pinger = Pinger(self.sh, src.name, dst.overlay_ip, self.out / f"ping-{label}.txt")
        pinger.start()
        return pinger

    def ping_burst(self, src: Machine, dst: Machine) -> dict:
        self.sh.run(["ping", "-c", "1", "-W", "3", dst.overlay_ip], netns=src.name, check=False)
        cp = self.sh.run(["ping", "-c", "10", "-i", "0.2", "-W", "2", dst.overlay_ip], netns=src.name, check=False)
        (self.out / "ping.txt").write_text(cp.stdout)
        return ping_figures(cp.stdout)

    def collect(self) -> None:
        for m in self.machines:
            for path in ("var/log/openvswitch/ovs-monitor-ipsec.log", "var/log/openvswitch/ovs-vswitchd.log",
                         "var/log/openvswitch/ovsdb-server.log", "var/log/openvswitch/ovs-monitor-ipsec-events.jsonl",
                         "var/log/lab-ping.log"):
                source = m.root / path
                if source.exists():
                    shutil.copy2(source, self.out / f"{m.name}-{Path(path).name}")
            if m.leader() is not None:
                m.run("journalctl", "--no-pager", "-b", "-o", "short-monotonic", check=False, timeout=60,
                      log=self.out / f"{m.name}-journal.txt")
                m.run("sh", "-c", "ip xfrm state; ip xfrm policy; ovs-vsctl show", check=False,
                      log=self.out / f"{m.name}-state.txt")


def run_scenario(sc: Scenario, out: Path, sh: Shell) -> dict:
    lab = Lab(sc, out, sh)
    result = {**sc.summary(), "phases": {}, "pass": False, "error": None}
    step = "prepare"
    try:
        prepare_vm(sh)
        h1, h2 = lab.machines
        for m, peer in ((h1, h2), (h2, h1)):
            m.create()
            prepare_disk(m, peer, pinger=(m is h1 and sc.expect == "reboot"))
        step = "capture"
        lab.wire.start()
        step = "boot"
        t = time.monotonic()
        for m in lab.machines:
            m.power_on()
        states = parallel(lambda m: m.wait_booted(240), lab.machines)
        result["first_boot_seconds"] = round(time.monotonic() - t, 1)
        result["boot_states"] = states
        say(f"[{sc.name}] both hosts booted ({states}) in {result['first_boot_seconds']}s")
        if sc.expect == "lifecycle":
            phases = [("install-start", phase_install_start), ("restart-ovs-ipsec", phase_restart_ovs_ipsec),
                      ("restart-strongswan", phase_restart_strongswan), ("logrotate", phase_logrotate)]
            if "ovsdb-late" in sc.name:
                phases.append(("ovsdb-late", phase_ovsdb_late))
            for name, phase in phases:
                step = name
                result["phases"][name] = phase(lab)
                say(f"[{sc.name}] {name}: {'ok' if result['phases'][name]['pass'] else 'FAILED'}")
        else:
            step = "tunnel"
            lab.configure()
            if sc.expect == "upgrade":
                # Upstream loads auto=route connections: trap policies first, SAs on the first packet,
                # and each direction's child only once that side sends (upstream's Geneve reply
                # direction can take an acquire timeout, 30 s). The switch starts from a tunnel that
                # carries traffic both ways.
                wait_for(lambda: all(parallel(lambda m: policies_any(m) > 0, lab.machines)), 120, interval=1.0)
                t_up = time.monotonic()
                both_ways = wait_for(lambda: lab.sh.run(["ping", "-c", "1", "-W", "1", h2.overlay_ip], netns=h1.name,
                                                        check=False, quiet=True).returncode == 0, 90, interval=0.5)
                result["upstream_both_ways_seconds"] = round(time.monotonic() - t_up, 1) if both_ways else None
                figures = lab.ping_burst(h1, h2)
                up = both_ways and wait_for(lambda: all(parallel(sas_up, lab.machines)), 30, interval=1.0)
            else:
                up = wait_for(lambda: all(parallel(ours_established, lab.machines)), 120, interval=1.0)
                figures = lab.ping_burst(h1, h2)
            result["phases"]["tunnel"] = {"established": up, **figures, "plaintext": lab.wire.plaintext(),
                                          "esp": lab.wire.esp(), "pass": up and figures["ping_received"] > 0}
            say(f"[{sc.name}] tunnel up: {up}, ping {figures['ping_received']}/{figures['ping_sent']}")
            if sc.expect == "upgrade":
                step = "migrate"
                result["phases"]["migrate"] = phase_migrate(lab, sc)
                if "rollback" in sc.name:
                    step = "rollback"
                    result["phases"]["rollback"] = phase_rollback(lab)
            else:
                step = "reboot"
                result["phases"]["reboot"] = phase_reboot(lab, sc)
        for name, phase in result["phases"].items():
            say(f"[{sc.name}] {name}: " + json.dumps({k: v for k, v in phase.items() if not isinstance(v, (list, dict))}))
    except Exception as e:   # noqa: BLE001 - the scenario's result names the step that broke
        import traceback
        result["error"] = f"{step}: {e}"
        (out / "error.txt").write_text(traceback.format_exc())
        say(f"[{sc.name}] ERROR in step {step}: {e}")
    finally:
        try:
            lab.collect()
        except Exception as e:   # noqa: BLE001
            say(f"[{sc.name}] collecting logs: {e}")
        for m in lab.machines:
            try:
                m.destroy()
            except Exception as e:   # noqa: BLE001
                say(f"[{sc.name}] teardown {m.name}: {e}")
        lab.wire.stop()
        try:
            result["plaintext_packets"] = lab.wire.plaintext()
            result["esp_packets"] = lab.wire.esp()
            (out / "wire.txt").write_text(sh.run(["tcpdump", "-n", "-r", lab.wire.pcap], check=False,
                                                 quiet=False).stdout[-200000:])
        except Exception:   # noqa: BLE001
            pass
        for m in lab.machines:
            if not os.path.ismount(m.root):
                shutil.rmtree(m.state, ignore_errors=True)
    result["ping_ok"] = all(p.get("ping_received", 1) > 0 for p in result["phases"].values())
    result["status_ok"] = bool(result["phases"]) and all(p.get("pass") for p in result["phases"].values())
    result["pass"] = not result["error"] and EXPECTATIONS[sc.expect](result)
    return result

