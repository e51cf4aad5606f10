"""Userspace ESP against kernel ESP on the real kernel (`control = "userspace-esp"`).

h1 is a userspace-datapath (netdev) hypervisor: ovs-vswitchd with br-phy (netdev, local_ip, an OVS
route to h2 through br-phy) whose uplink is a veth to our bump, `ovs-ipsec userspace-esp`, with
manual SAs in OVSDB (options:esp_*). h2 is a kernel-datapath hypervisor: ovs-vswitchd on the
kernel datapath and kernel XFRM SAs holding the same keys, set by hand (`ip xfrm state` and
`ip xfrm policy`, transport mode, bound to the tunnel's protocol and port as upstream binds
them). The two must interoperate: ping across the overlay both ways, only ESP on the wire.

The oracle: `ovs-ipsec pcap-decrypt` on the underlay capture, with the keys read back from h2's
kernel (`ip xfrm state`), must decrypt every ESP packet to the scenario's tunnel type carrying
the overlay's ARP and pings and nothing else; and the kernel's own SA counters must agree with
what our bump says it sent.

With `auth = "psk"` (IKEv2, no C involved): h1 runs charon too, configured by hand with the
traffic selectors and proposals our monitor gives h2's charon, but with `policies = no` and
`mark_in`/`mark_out` (`mark_in_sa = yes`): charon negotiates the transport SAs and installs them in
h1's kernel inert, and the bump (`--ike-keys`) reads them back from the kernel (`ip -s xfrm state`)
and does the ESP. h2 is an ordinary kernel-datapath hypervisor with our monitor and charon.

Keys never reach the results folder: the xfrm batch and the decryptor's key file stay in the
VM's work folder (tmpfs), and the transcript shows `ip -batch FILE`, not the keys.
"""

import json
import re
import secrets
import shutil
import subprocess
import time
import traceback
from pathlib import Path

from auth import PSK
from backends import StrongSwan
from capture import ESP, Capture
from hosts import BRIDGE, TUNNEL_PORT, Host, Topology
from monitor import CLI, PYTHON_ENV, Monitor, tunnel_established
from proc import Shell, stop_pidfile, wait_for
from scenario import DEFAULT_PORTS, OVERLAY, Scenario

UPLINK_OVS, UPLINK_BUMP = "esp-ovs", "esp-gw"
SPI_12, SPI_21 = 0x1001, 0x1002   # h1 -> h2, h2 -> h1
INNER_OK = {"arp-request", "arp-reply", "icmp-echo-request", "icmp-echo-reply"}
ENCAPSULATION = {"vxlan": "vxlan", "geneve": "geneve", "gre": "gre"}
PING = ["ping", "-c", "5", "-i", "0.5", "-W", "2"]
# Overlay MTU the bump reports at a 1500-byte path MTU, per tunnel type (inner Ethernet, no options).
OVERLAY_MTU = {"vxlan": 1416, "geneve": 1416, "gre": 1428}


def key() -> str:
    return "0x" + secrets.token_hex(20)   # AES-128 and its 4-byte salt


# h1's charon for the IKE variant: the children our monitor gives h2's charon (mirrored), but
# installed inert: no policies, and marks on both SAs (mark_in_sa: the inbound SA too, not only
# its policy), so the kernel never uses them and unmarked arriving ESP finds no kernel SA.
SWANCTL_CONF = """\
connections {{
  userspace-{name} {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = aes256gcm16-sha256-modp2048
    local {{
      auth = psk
      id = {local}
    }}
    remote {{
      auth = psk
      id = {remote}
    }}
    children {{
{children}
    }}
  }}
}}
secrets {{
  ike-{name} {{
    id-1 = {local}
    id-2 = {remote}
    secret = "{psk}"
  }}
}}
"""
CHILD = """\
      {name} {{
        mode = transport
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = aes256gcm16-modp2048
        policies = no
        mark_in = 0x2a/0xffffffff
        mark_in_sa = yes
        mark_out = 0x2a/0xffffffff
        start_action = start
      }}
"""


def swanctl_conf(sc: Scenario, host: Host, peer: Host) -> str:
    if sc.tunnel == "gre":
        children = CHILD.format(name="tun-gre", local_ts="dynamic[gre]", remote_ts="dynamic[gre]")
    else:
        port = DEFAULT_PORTS[sc.tunnel]
        children = (CHILD.format(name="tun-in", local_ts=f"dynamic[udp/{port}]", remote_ts="dynamic[udp]")
                    + CHILD.format(name="tun-out", local_ts="dynamic[udp]", remote_ts=f"dynamic[udp/{port}]"))
    return SWANCTL_CONF.format(name=sc.tunnel, local=host.ip, remote=peer.ip, children=children, psk=PSK)


class Bump:
    """`ovs-ipsec userspace-esp` on a netdev host."""

    logs = ("esp.log", "esp.out")

    def __init__(self, host: Host, ike_keys: bool = False):
        self.host = host
        self.ctl = host.dir / "esp.ctl"
        self.pidfile = host.dir / "esp.pid"
        self.ike_keys = ike_keys

    def start(self) -> None:
        h, d = self.host, self.host.dir
        h.sh.run([*CLI, "userspace-esp", h.db, "--uplink", UPLINK_BUMP, "--state-dir", d / "esp-state",
                  "--unixctl", self.ctl, "--pidfile", self.pidfile, "--log-file", d / "esp.log", "--detach",
                  "--no-chdir", "-vfile:dbg", *(["--ike-keys"] if self.ike_keys else [])],
                 netns=h.name, env={**PYTHON_ENV, **h.ovs_env}, log=d / "esp.out", timeout=90)
        if not wait_for(self.ctl.exists, timeout=30):
            raise RuntimeError(f"{h.name}: userspace-esp did not create {self.ctl} (see esp.out)")

    def status(self) -> dict:
        cp = self.host.sh.run(["ovs-appctl", "-t", self.ctl, "esp/show", "--json"], timeout=15, quiet=True)
        return json.loads(cp.stdout)

    def tunnel(self) -> dict:
        return next((t for t in self.status()["tunnels"] if t["name"] == TUNNEL_PORT), {})

    def stop(self) -> None:
        stop_pidfile(self.pidfile)


def netdev_host(sc: Scenario, host: Host, peer: Host, options: dict) -> None:
    """What the operator of a userspace-datapath hypervisor types (see README, Userspace ESP)."""
    run = host.sh.run
    run(["ip", "link", "add", UPLINK_OVS, "type", "veth", "peer", "name", UPLINK_BUMP], netns=host.name)
    for dev in (UPLINK_OVS, UPLINK_BUMP):
        run(["ip", "link", "set", dev, "up"], netns=host.name)
    host.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev")
    host.vsctl("add-port", "br-phy", UPLINK_OVS)
    run(["ip", "addr", "add", f"{host.ip}/{host.prefix}", "dev", "br-phy", "noprefixroute"], netns=host.name)
    run(["ip", "link", "set", "br-phy", "up"], netns=host.name)
    host.appctl("ovs-vswitchd", "ovs/route/add", f"{peer.ip}/32", "br-phy")
    host.vsctl("add-br", BRIDGE, "--", "set", "bridge", BRIDGE, "datapath_type=netdev")
    run(["sysctl", "-qw", f"net.ipv6.conf.{BRIDGE}.disable_ipv6=1"], netns=host.name)
    run(["ip", "addr", "add", f"{host.overlay_ip}/{OVERLAY[2]}", "dev", BRIDGE], netns=host.name)
    run(["ip", "link", "set", BRIDGE, "up"], netns=host.name)
    argv = ["ovs-vsctl", "--timeout=60", f"--db={host.db}", "add-port", BRIDGE, TUNNEL_PORT, "--", "set",
            "interface", TUNNEL_PORT, f"type={sc.tunnel}", f"options:local_ip={host.ip}",
            f"options:remote_ip={peer.ip}", *[f"options:{k}={v}" for k, v in options.items()]]
    # Not through the Shell: its transcript (in /results) would show the keys.
    host.sh.note("$ " + " ".join(re.sub(r"(esp_\w+_key)=\S+", r"\1=<redacted>", a) for a in argv))
    subprocess.run(argv, check=True, timeout=90, capture_output=True)


def kernel_host(sc: Scenario, host: Host, peer: Host, out_key: str, in_key: str, work: Path) -> None:
    """The kernel-datapath peer: its tunnel as usual, and manual transport SAs and policies for
    exactly the tunnel's traffic (protocol and port), the way upstream's charon binds them."""
    host.add_bridge()
    host.vsctl("add-port", BRIDGE, TUNNEL_PORT, "--", "set", "interface", TUNNEL_PORT, f"type={sc.tunnel}",
               f"options:local_ip={host.ip}", f"options:remote_ip={peer.ip}")
    selector = "proto gre" if sc.tunnel == "gre" else f"proto udp dport {DEFAULT_PORTS[sc.tunnel]}"
    a, b = host.ip, peer.ip
    batch = work / f"{host.name}-xfrm.batch"   # in the VM's tmpfs work folder, never in /results
    batch.write_text(
        f"xfrm state add src {a} dst {b} proto esp spi 0x{SPI_21:08x} reqid 21 mode transport "
        f"aead rfc4106(gcm(aes)) {out_key} 128 sel src {a}/32 dst {b}/32 {selector}\n"
        f"xfrm state add src {b} dst {a} proto esp spi 0x{SPI_12:08x} reqid 12 mode transport "
        f"replay-window 64 aead rfc4106(gcm(aes)) {in_key} 128 sel src {b}/32 dst {a}/32 {selector}\n"
        f"xfrm policy add src {a}/32 dst {b}/32 {selector} dir out "
        f"tmpl src {a} dst {b} proto esp reqid 21 mode transport\n"
        f"xfrm policy add src {b}/32 dst {a}/32 {selector} dir in "
        f"tmpl src {b} dst {a} proto esp reqid 12 mode transport\n")
    batch.chmod(0o600)
    host.sh.run(["ip", "-batch", batch], netns=host.name)


def xfrm_sa_packets(host: Host, spi: int) -> int | None:
    """Packets the kernel counted on one SA (`ip -s xfrm state`, lifetime current)."""
    cp = host.sh.run(["ip", "-s", "xfrm", "state", "list", "spi", f"0x{spi:08x}"], netns=host.name, check=False,
                     quiet=True)
    m = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", cp.stdout)
    return int(m.group(2)) if m else None


def save_xfrm_state(host: Host, path: Path) -> Path | None:
    """`ip xfrm state` of a host, keys included, into the VM's work folder (never /results)."""
    cp = host.sh.run(["ip", "xfrm", "state"], netns=host.name, quiet=True, check=False)
    if cp.returncode != 0 or not cp.stdout.strip():
        return None
    path.write_text(cp.stdout)
    path.chmod(0o600)
    return path


def decrypt(host: Host, pcap: Path, keys_from: Path, ports: tuple = ()) -> dict:
    """ovs-ipsec pcap-decrypt --json on the capture, keys from an `ip xfrm state` listing."""
    extra = [argument for kind_port in ports for argument in ("--port", kind_port)]
    cp = host.sh.run([*CLI, "pcap-decrypt", pcap, "--sa-file", keys_from, "--json", *extra], env=PYTHON_ENV,
                     timeout=120, quiet=True)
    return json.loads(cp.stdout)


def kernel_oracle(sc: Scenario, host: Host, pcap: Path, keys_from: Path, out: Path) -> dict:
    """The oracle for the kernel (IKE) scenarios: the capture decrypted with the SAs the kernel of
    `host` held (both directions: each host has its inbound and outbound SAs)."""
    ports = (f"{sc.tunnel}:{sc.port}",) if sc.port and sc.port != DEFAULT_PORTS.get(sc.tunnel) else ()
    report = decrypt(host, pcap, keys_from, ports)
    (out / "decrypted.json").write_text(json.dumps(report, indent=1) + "\n")
    return oracle(report, sc.tunnel, OVERLAY[:2])


def oracle(report: dict, tunnel: str, overlay: tuple) -> dict:
    """Does the ESP carry exactly the overlay's ARP and pings in the scenario's tunnel type?"""
    counts = report["counts"]
    packets = report["packets"]
    encapsulations = {p["encapsulation"].get("type") for p in packets if p["status"] == "decrypted"}
    inner = set(counts["inner"])
    addresses = {(p["inner"].get("src"), p["inner"].get("dst")) for p in packets if p["inner"].get("src")}
    allowed = {(overlay[0], overlay[1]), (overlay[1], overlay[0])}
    result = {
        "oracle_esp": counts["esp"], "oracle_decrypted": counts["decrypted"], "oracle_inner": counts["inner"],
        "oracle_status": counts["status"], "oracle_encapsulation": sorted(encapsulations),
        "oracle_duplicate_seq": sum(sa["duplicate_seq"] for sa in counts["sa"].values()),
    }
    result["oracle_ok"] = (counts["esp"] > 0 and counts["decrypted"] == counts["esp"]
                           and encapsulations == {ENCAPSULATION[tunnel]} and inner <= INNER_OK
                           and addresses <= allowed and result["oracle_duplicate_seq"] == 0)
    return result


def ping(src: Host, dst: Host, out: Path, label: str) -> tuple:
    src.sh.run(["ping", "-c", "1", "-W", "3", dst.overlay_ip], netns=src.name, check=False)
    cp = src.sh.run([*PING, dst.overlay_ip], netns=src.name, check=False, timeout=30)
    (out / f"ping-{label}.txt").write_text(cp.stdout + cp.stderr)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", cp.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def mtu_check(h1: Host, h2: Host, mtu: int, out: Path) -> dict:
    """From the netdev side: a DF ping at the reported overlay MTU crosses; one byte more is
    refused, and h1's kernel is told (ICMP inside the tunnel) rather than left guessing."""
    fits = h1.sh.run(["ping", "-c", "2", "-i", "0.5", "-W", "2", "-M", "do", "-s", str(mtu - 28), h2.overlay_ip],
                     netns=h1.name, check=False, timeout=30)
    big = h1.sh.run(["ping", "-c", "2", "-i", "0.5", "-W", "2", "-M", "do", "-s", str(mtu - 27), h2.overlay_ip],
                    netns=h1.name, check=False, timeout=30)
    (out / "ping-mtu.txt").write_text(fits.stdout + fits.stderr + big.stdout + big.stderr)
    route = h1.sh.run(["ip", "route", "get", h2.overlay_ip], netns=h1.name, check=False).stdout
    fit_ok = " 0% packet loss" in fits.stdout or re.search(r"2 received", fits.stdout) is not None
    return {"mtu": mtu, "mtu_fits_ok": bool(fit_ok), "mtu_big_refused": " 0 received" in big.stdout,
            "mtu_told": f"mtu {mtu}" in route or f"mtu={mtu}" in big.stdout + big.stderr}


def run(sc: Scenario, results: Path, work_root: Path, say) -> dict:
    out = results / sc.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work = work_root / sc.name
    sh = Shell(out / "commands.log")
    topology = Topology(sc, work, sh)
    h1, h2 = topology.hosts
    capture = Capture(h2, out / "underlay.pcap")
    ike = sc.auth == "psk"
    bump = Bump(h1, ike_keys=ike)
    charon = StrongSwan() if ike else None
    monitor = Monitor(h2, charon) if ike else None
    result = {**sc.summary(), "ping_ok": False, "ping_back_ok": False, "esp_packets": 0, "plaintext_packets": None,
              "oracle_ok": False, "bump_ok": False, "kernel_counters_ok": False, "pass": False, "error": None}
    step, t0 = "underlay", time.monotonic()
    # The netdev datapath's bridges are tap devices: /dev/net/tun appears once tun is loaded
    # (there is no udev in the VM to make its static node).
    subprocess.run(["modprobe", "-q", "tun"], check=False)
    say(f"[{sc.name}] start: {sc.tunnel} netdev + userspace ESP (h1) <-> kernel datapath + kernel ESP (h2)")
    try:
        topology.up()
        step = "capture"
        capture.start()
        step = "daemons"
        for host in (h1, h2):
            host.start_ovs()
        step = "configure"
        if ike:
            for host in (h1, h2):
                charon.start(host)
            monitor.start()
            # h2: the ordinary kernel-datapath host, its tunnel encrypted by our monitor and charon.
            h2.add_bridge()
            h2.add_tunnel(sc, h1, {"psk": PSK})
            # h1: the netdev host, the same tunnel options an operator would set (psk) ...
            netdev_host(sc, h1, h2, {"psk": PSK})
            bump.start()
            # ... and its charon, given inert children by hand (the monitor cannot render them yet).
            conf = work / "h1-swanctl.conf"
            conf.write_text(swanctl_conf(sc, h1, h2))
            conf.chmod(0o600)
            h1.sh.run(["swanctl", "--load-all", "--file", conf, "--uri", f"unix://{charon.vici(h1)}"],
                      netns=h1.name, timeout=60)
        else:
            key_12, key_21 = key(), key()
            netdev_host(sc, h1, h2, {"esp_out_spi": f"0x{SPI_12:x}", "esp_in_spi": f"0x{SPI_21:x}",
                                     "esp_out_key": key_12, "esp_in_key": key_21})
            kernel_host(sc, h2, h1, key_21, key_12, work)
            bump.start()
        step = "active"
        if not wait_for(lambda: bump.tunnel().get("state") == "active", timeout=90):
            raise RuntimeError(f"the bump never reported {TUNNEL_PORT} active: {bump.status()}")
        if ike:
            result["h2_established"] = wait_for(lambda: tunnel_established(monitor.poll())[0], timeout=60)
        step = "ping"
        result["ping_sent"], result["ping_received"] = ping(h1, h2, out, "h1-h2")
        result["ping_back_sent"], result["ping_back_received"] = ping(h2, h1, out, "h2-h1")
        result["ping_ok"] = result["ping_received"] >= 1
        result["ping_back_ok"] = result["ping_back_received"] >= 1
        step = "mtu"
        result.update(mtu_check(h1, h2, OVERLAY_MTU[sc.tunnel], out))
        step = "counters"
        tunnel = bump.tunnel()
        (out / "h1-esp-status.json").write_text(json.dumps(bump.status(), indent=2) + "\n")
        result["bump"] = {k: tunnel.get(k) for k in ("state", "overlay_mtu", "out_seq", "outbound", "inbound")}
        inbound_drops = tunnel.get("inbound", {}).get("drops", {})
        result["bump_ok"] = (tunnel.get("state") == "active" and tunnel["outbound"]["packets"] > 0
                             and tunnel["inbound"]["packets"] > 0 and not inbound_drops)
        spi_12, spi_21 = (int(tunnel["out_spi"], 16), int(tunnel["in_spi"], 16)) if ike else (SPI_12, SPI_21)
        result["spis"] = [f"0x{spi_12:08x}", f"0x{spi_21:08x}"]
        result["kernel_in_packets"] = xfrm_sa_packets(h2, spi_12)
        result["kernel_out_packets"] = xfrm_sa_packets(h2, spi_21)
        if ike:
            # h1's kernel holds the same SAs inert: it must not have decrypted or sent anything.
            result["h1_kernel_packets"] = [xfrm_sa_packets(h1, spi) for spi in (spi_12, spi_21)]
        # What h2's kernel verified on our SA is what we sealed (the too-big ones never left);
        # what it sealed for us is what we verified.
        result["kernel_counters_ok"] = (result["kernel_in_packets"] == tunnel["outbound"]["packets"]
                                        and result["kernel_out_packets"] == tunnel["inbound"]["packets"]
                                        and (not ike or result["h1_kernel_packets"] == [0, 0]))
    except Exception as e:
        result["error"] = f"{step}: {e}"
        (out / "error.txt").write_text(traceback.format_exc())
        say(f"[{sc.name}] ERROR in step {step}: {e}")
    finally:
        try:
            capture.stop()
            result["esp_packets"] = capture.count(ESP)
            result["plaintext_packets"] = capture.count(sc.plaintext_filter)
            (out / "underlay.txt").write_text(capture.text())
            keys_from = save_xfrm_state(h2, work / "h2-xfrm-state.txt")
            if result["esp_packets"] and keys_from:
                report = decrypt(h2, capture.pcap, keys_from)
                (out / "decrypted.json").write_text(json.dumps(report, indent=1) + "\n")
                result.update(oracle(report, sc.tunnel, OVERLAY[:2]))
        except Exception as e:
            result["error"] = result["error"] or f"capture/oracle: {e}"
            (out / "error-oracle.txt").write_text(traceback.format_exc())
        for host in (h1, h2):
            try:
                (out / f"{host.name}-state.txt").write_text(_snapshot(host))
            except Exception:
                pass
        stops = [bump.stop, h1.stop_ovs, h2.stop_ovs]
        if ike:
            stops = [monitor.stop, lambda: charon.stop(h1), lambda: charon.stop(h2)] + stops
        for stop in stops:
            try:
                stop()
            except Exception as e:
                say(f"teardown: {e}")
        ike_logs = ("charon.log", "charon.out") if ike else ()
        for host, logs in ((h1, ("ovsdb-server.log", "ovs-vswitchd.log", *Bump.logs, *ike_logs)),
                           (h2, ("ovsdb-server.log", "ovs-vswitchd.log", *ike_logs,
                                 *(Monitor.logs if ike else ())))):
            for log in logs:
                if (host.dir / log).exists():
                    shutil.copy2(host.dir / log, out / f"{host.name}-{log}")
        topology.down()
    result["pass"] = bool(not result["error"] and result["ping_ok"] and result["ping_back_ok"]
                          and result["esp_packets"] > 0 and result["plaintext_packets"] == 0
                          and result["oracle_ok"] and result["bump_ok"] and result["kernel_counters_ok"]
                          and result.get("mtu_fits_ok") and result.get("mtu_big_refused") and result.get("mtu_told"))
    result["seconds"] = round(time.monotonic() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _snapshot(host: Host) -> str:
    """Host.snapshot's views, with quiet commands (the transcript would keep their output, keys
    included) and the keys redacted."""
    parts = []
    for title, argv, netns in (
        ("ovs-vsctl show", ["ovs-vsctl", f"--db={host.db}", "--timeout=10", "show"], None),
        ("interface table", ["ovs-vsctl", f"--db={host.db}", "--timeout=10", "list", "interface"], None),
        ("ovs/route/show", ["ovs-appctl", "-t", host.dir / "ovs-vswitchd.ctl", "ovs/route/show"], None),
        ("tnl/neigh/show", ["ovs-appctl", "-t", host.dir / "ovs-vswitchd.ctl", "tnl/neigh/show"], None),
        ("dpctl/dump-flows", ["ovs-appctl", "-t", host.dir / "ovs-vswitchd.ctl", "dpctl/dump-flows"], None),
        ("ip -s xfrm state", ["ip", "-s", "xfrm", "state"], host.name),
        ("ip xfrm policy", ["ip", "xfrm", "policy"], host.name),
        ("ip -br addr", ["ip", "-br", "addr"], host.name),
    ):
        try:
            cp = host.sh.run(argv, check=False, timeout=15, quiet=True, **({"netns": netns} if netns else {}))
            parts.append(f"=== {title}\n{cp.stdout}{cp.stderr}")
        except Exception as e:   # diagnostics must never hide the real failure
            parts.append(f"=== {title}\n{e}")
    return _redacted("\n".join(parts))


def _redacted(text: str) -> str:
    """Host snapshots list `ip -s xfrm state` and the Interface table: keep the SAs, not their keys."""
    text = re.sub(r"(aead \S+|enc \S+|auth(?:-trunc)? \S+) 0x[0-9a-fA-F]+", r"\1 0x<redacted>", text)
    return re.sub(r'(esp_\w+_key)=("?)0x[0-9a-fA-F]+', r"\1=\2<redacted>", text)
