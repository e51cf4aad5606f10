"""What `esp/show` prints: every userspace ESP tunnel, its SPIs, MTU and counters. Pure.

Never a key: the engine's status holds SPIs and counters only, and invalid tunnels carry the
validator's reason, which names options but never quotes their values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .engine import CounterSnapshot, EngineStatus
from .sa import Invalid


@dataclass(frozen=True)
class ServiceStatus:
    engine: EngineStatus
    invalid: tuple[Invalid, ...]
    uplink: str
    datapath: dict


def _counters(snapshot: CounterSnapshot) -> dict:
    return {"packets": snapshot.packets, "bytes": snapshot.bytes, "drops": dict(snapshot.drops)}


def as_dict(status: ServiceStatus) -> dict:
    tunnels = [{
        "name": t.name, "type": t.kind, "state": t.state, "reason": t.reason,
        "local_ip": t.local_ip, "remote_ip": t.remote_ip, "dst_port": t.dst_port,
        "out_spi": f"0x{t.out_spi:08x}", "in_spi": f"0x{t.in_spi:08x}", "replay_window": t.replay_window,
        "path_mtu": t.path_mtu, "overlay_mtu": t.overlay_mtu, "out_seq": t.out_seq,
        "outbound": _counters(t.outbound), "inbound": _counters(t.inbound),
    } for t in status.engine.tunnels]
    tunnels += [{"name": i.name, "state": i.state, "reason": i.reason} for i in status.invalid]
    tunnels.sort(key=lambda t: str(t["name"]))
    return {
        "uplink": status.uplink,
        "gateway_mac": status.engine.gateway_mac,
        "bridge_macs": dict(status.engine.bridge_macs),
        "counters": dict(status.engine.counters),
        "datapath": status.datapath,
        "tunnels": tunnels,
    }


def render_json(status: ServiceStatus) -> str:
    return json.dumps(as_dict(status), indent=2, sort_keys=True) + "\n"


def render_text(status: ServiceStatus) -> str:
    data = as_dict(status)
    lines = [f"uplink {data['uplink']} (answers as {data['gateway_mac']}); br-phy MACs: "
             + (", ".join(f"{ip} at {mac}" for ip, mac in data["bridge_macs"].items()) or "none learned yet")]
    for t in data["tunnels"]:
        if t["state"] in ("invalid", "pending"):
            lines.append(f"{t['name']}: {t['state']}: {t['reason']}")
            continue
        port = f":{t['dst_port']}" if t["dst_port"] else ""
        lines.append(f"{t['name']}: {t['state']} {t['type']} {t['local_ip']} -> {t['remote_ip']}{port}"
                     f"  SPI out {t['out_spi']} in {t['in_spi']}  path MTU {t['path_mtu']}, overlay MTU "
                     f"{t['overlay_mtu']}")
        if t["reason"]:
            lines.append(f"    error: {t['reason']}")
        for direction in ("outbound", "inbound"):
            c = t[direction]
            drops = ", ".join(f"{k} {v}" for k, v in sorted(c["drops"].items())) or "none"
            lines.append(f"    {direction:8} {c['packets']} packets, {c['bytes']} bytes; dropped: {drops}")
    if data["counters"]:
        lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(data["counters"].items())))
    return "\n".join(lines) + "\n"
