"""Upstream's "established conns survive a third host joining" (tests/system-ipsec.at, ipv4 and
ipv6), on the real kernel (scenario field `third_host`; issue 13).

Once the scenario's tunnel h1 <-> h2 is established and has carried the ping, h3 boots (OVS, the
IKE daemon, our monitor) and joins with a tunnel to h1 (`tun`), h1 adding `tun3` to h3 (h3 <-> h1
only: no loop in the overlay). Upstream compares pluto's state serials before and after; here the
kernel's own record of the child SAs is compared, for both IKE daemons: the ESP SAs (SPIs) between
h1 and h2. Checks (each must hold for the scenario to pass):

* h2_sas_unchanged: h2's ESP SAs are exactly what they were;
* h1_sas_kept: every ESP SA h1 had with h2 is still there;
* third_established: both monitors report the new tunnel established;
* third_ping: h1 pings h3 over the overlay, and h2 again;
* third_esp, third_plaintext_zero: on h3's underlay (a capture of its own), ESP and no tunnel
  packet in the clear.
"""

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from auth import AUTH
from capture import ESP, Capture
from hosts import Host, Topology
from monitor import Monitor, tunnel_established
from proc import wait_for

TUNNEL = "tun3"          # h1's tunnel to h3 (h3's to h1 is the scenario's usual name, "tun")
ESTABLISH_TIMEOUT = 60


def esp_sas(host: Host, between: tuple) -> set:
    """(src, dst, spi) of the ESP SAs in host's kernel whose ends are the two addresses `between`."""
    cp = host.sh.run(["ip", "xfrm", "state"], netns=host.name, quiet=True, timeout=15)
    return {(src, dst, spi) for src, dst, spi in
            re.findall(r"^src (\S+) dst (\S+)\s*\n\s*proto esp spi (0x[0-9a-f]+)", cp.stdout, re.M)
            if {src, dst} == set(between)}


def ping(host: Host, address: str) -> int:
    host.sh.run(["ping", "-c", "1", "-W", "3", address], netns=host.name, check=False)
    cp = host.sh.run(["ping", "-c", "3", "-i", "0.5", "-W", "2", address], netns=host.name, check=False, timeout=30)
    m = re.search(r"(\d+) received", cp.stdout)
    return int(m.group(1)) if m else 0


def phase(sc, topology: Topology, backend, monitors: list, steps, result: dict, out: Path) -> None:
    """h3 joins; fills result["checks"] and result["third"] (the figures)."""
    h1, h2 = topology.hosts
    h3 = topology.third
    steps("third-host")
    pair = (h1.ip, h2.ip)
    before = {"h1": esp_sas(h1, pair), "h2": esp_sas(h2, pair)}
    capture = Capture(h3, out / "underlay-h3.pcap")
    capture.start()
    figures = {"before": {k: sorted(v) for k, v in before.items()}}
    result["third"] = figures
    try:
        m3 = Monitor(h3, backend)
        monitors.append(m3)   # torn down with the others
        with ThreadPoolExecutor(max_workers=2) as pool:
            for f in [pool.submit(h3.start_ovs), pool.submit(backend.start, h3)]:
                f.result()
        m3.start()
        h3.add_bridge()
        h3.add_tunnel(sc, h1, AUTH[sc.auth](h3, h1))
        h1.add_tunnel(sc, h3, AUTH[sc.auth](h1, h3), name=TUNNEL)
        joined = time.monotonic()
        m1 = next(m for m in monitors if m.host is h1)
        established = wait_for(lambda: tunnel_established(_poll(m1), TUNNEL)[0]
                               and tunnel_established(_poll(m3), m3.tunnel)[0], timeout=ESTABLISH_TIMEOUT, interval=0.5)
        figures["established_seconds"] = round(time.monotonic() - joined, 1)
        figures["ping_h3_received"] = ping(h1, h3.overlay_ip)
        figures["ping_h2_received"] = ping(h1, h2.overlay_ip)
        after = {"h1": esp_sas(h1, pair), "h2": esp_sas(h2, pair)}
        figures["after"] = {k: sorted(v) for k, v in after.items()}
        result["checks"].update({
            "h2_sas_unchanged": bool(before["h2"]) and after["h2"] == before["h2"],
            "h1_sas_kept": bool(before["h1"]) and before["h1"] <= after["h1"],
            "third_established": established,
            "third_ping": figures["ping_h3_received"] >= 1 and figures["ping_h2_received"] >= 1,
        })
    finally:
        time.sleep(1)
        capture.stop()
        figures["h3_esp_packets"] = capture.count(ESP) if capture.pcap.exists() else 0
        figures["h3_plaintext_packets"] = capture.count(sc.plaintext_filter) if capture.pcap.exists() else None
        result["checks"]["third_esp"] = figures["h3_esp_packets"] > 0
        result["checks"]["third_plaintext_zero"] = figures["h3_plaintext_packets"] == 0


def _poll(monitor) -> dict:
    try:
        return monitor.poll()
    except Exception as e:   # not up yet
        return {"error": str(e)}
