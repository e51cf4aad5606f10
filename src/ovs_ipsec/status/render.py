"""Status snapshot -> text for people (upstream's tunnels/show layout, a table) and JSON for tools.

Pure. No secret is ever printed: a PSK shows as a mask, keys only as paths. Names, reasons and
paths can come from anyone who writes OVSDB: every line goes through `text.printable`, so no
value can add a line, move the cursor or colour the operator's terminal.
"""

from __future__ import annotations

import json
import time

from ..model import TunnelState
from ..text import printable
from .kernel import KernelView, tunnel_policies, tunnel_states
from .snapshot import StatusSnapshot, TunnelStatus

PSK_MASK = "<hidden>"


def render_json(snapshot: StatusSnapshot) -> str:
    return json.dumps(snapshot.as_json(), indent=2, sort_keys=True) + "\n"


def render_show(snapshot: StatusSnapshot, kernel: KernelView | None = None) -> str:
    """`tunnels/show` in upstream's layout, so existing habits and scripts keep working.

    The "v1" version field is kept for layout compatibility; connection names here derive from
    the tunnel's parameters, so there is no version counter behind it. With `kernel`, each tunnel
    also lists the XFRM policies and SAs that concern it, as upstream's does (without keys).
    """
    guard = _guard_line(snapshot.guard.as_json())
    if not snapshot.tunnels:
        return "No tunnels configured with IPsec\n" + guard
    config = snapshot.global_config
    blocks = []
    for tunnel in snapshot.tunnels:
        if tunnel.state in (TunnelState.INVALID, TunnelState.UNPROTECTED):
            header = f"Interface name: {tunnel.name} v1 ({tunnel.state.value.upper()}: {tunnel.reason})"
        else:
            header = f"Interface name: {tunnel.name} v1 (CONFIGURED)"
        certificate_mode = tunnel.auth in ("peer-cert", "ca-cert")
        fields = [
            ("Tunnel Type", tunnel.type),
            ("Local IP", tunnel.local_ip or "%any"),
            ("Remote IP", tunnel.remote_ip),
            ("Address Family", _family(tunnel)),
            ("SKB mark", config.skb_mark),
            ("Local cert", config.certificate if certificate_mode else None),
            ("Local name", tunnel.local_name),
            ("Local key", config.private_key if certificate_mode else None),
            ("Remote cert", "(pinned certificate)" if tunnel.remote_cert else None),
            ("Remote name", tunnel.remote_name),
            ("CA cert", config.ca_cert if tunnel.auth == "ca-cert" else None),
            ("PSK", PSK_MASK if tunnel.auth == "psk" else None),
            ("Custom Options", "{" + ", ".join(f"'{k}': '{v}'" for k, v in tunnel.options) + "}"),
            ("Ignored Options", "; ".join(f"{k} ({why})" for k, why in tunnel.ignored_options) or None),
            ("Ofport", tunnel.ofport if tunnel.ofport is not None else "Not assigned"),
            ("CFM state", {None: "Disabled", False: "Up", True: "Down"}[tunnel.cfm_fault]),
            ("State", tunnel.state.value + (f": {tunnel.reason}" if tunnel.reason else "")),
            ("Last good", _last_good(tunnel)),
            ("Encrypting", "yes" if tunnel.encrypting else "no"),
            ("Connection", tunnel.conn),
        ]
        lines = [header] + [f"  {label + ':':<16}{_none(value)}" for label, value in fields
                            if label not in ("Ignored Options", "Last good") or value is not None]
        if kernel is not None:
            lines.append("Kernel policies installed:")
            lines += [f"  {line}" for line in ([kernel.error] if kernel.error else
                                                tunnel_policies(tunnel, kernel.policies))]
            lines.append("Kernel security associations installed:")
            lines += [f"  {line}" for line in ([kernel.error] if kernel.error else
                                                tunnel_states(tunnel, kernel.states))]
        lines.append("IPsec connections that are active:")
        lines += [f"  {line}" for line in tunnel.sa_lines]
        blocks.append("\n".join(printable(line) for line in lines) + "\n")
    return "\n".join(blocks) + (f"\n{guard}" if guard else "")


def _last_good(tunnel: TunnelStatus) -> str | None:
    if tunnel.last_good_since is None:
        return None
    return f"the last valid configuration stays in force (since {_iso(tunnel.last_good_since)})"


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def render_upstream_status(snapshot: StatusSnapshot) -> str:
    """`ipsec/status` as upstream answers it (tools parse it): a Python dict of each tunnel's
    connections whose child SA is installed, named as upstream names them (`<tunnel>-in-1`,
    `<tunnel>-out-1`, or `<tunnel>-1` for GRE). Values hold no single quote, so the usual
    quote-swapping conversion to JSON works."""
    found: dict[str, dict[str, str]] = {}
    for tunnel in snapshot.tunnels:
        for child in tunnel.installed_children:
            direction = child.rsplit("-", 2)[-2]
            name = f"{tunnel.name}-1" if direction == "gre" else f"{tunnel.name}-{direction}-1"
            found.setdefault(tunnel.name, {})[name] = (
                f'#{tunnel.ike_sa_ids[0] if tunnel.ike_sa_ids else "?"}: "{name}" child SA {child} installed, '
                f"IKE SA of {tunnel.conn}")
    return repr(found)


def render_table(status: dict, now: float) -> str:
    """A table from the status JSON (the stable interface): one line per tunnel, reason last.

    Made to scan a full mesh at a glance: the peer by name and address, SAs as IKE/child, a
    count per state at the end. LOCAL appears only when the tunnels do not all share one.
    """
    tunnels = status.get("tunnels", [])
    locals_ = {tunnel["local_ip"] for tunnel in tunnels}
    show_local = len(locals_) > 1
    header = ("TUNNEL", "TYPE", *(("LOCAL",) if show_local else ()), "STATE", "PEER", "AUTH", "SAS", "SINCE",
              "REASON")
    rows = [header]
    for tunnel in tunnels:
        state = tunnel["state"] + (" (last good kept)" if tunnel.get("last_good_since") is not None else "")
        rows.append(tuple(printable(str(cell)) for cell in (
            tunnel["name"], tunnel["type"], *((tunnel["local_ip"] or "-",) if show_local else ()),
            state, _peer(tunnel), tunnel["auth"] or "-", f"{tunnel['ike_sas']}/{tunnel['child_sas']}",
            _age(tunnel.get("since"), now), tunnel["reason"] or "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
           for row in rows]
    out.append(_summary(tunnels, None if show_local or not tunnels else next(iter(locals_))))
    daemon = status.get("ike_daemon") or {}
    if daemon.get("error"):
        out.append(printable(f"IKE daemon: {daemon['error']}"))
    guard = _guard_line(status.get("guard") or {})
    if guard:
        out.append(guard)
    return "\n".join(printable(line.rstrip()) for line in out) + "\n"


def _guard_line(guard: dict) -> str:
    """The plaintext guard in one line; nothing when it is off and fine (upstream's layout then)."""
    mode, error = guard.get("mode", "off"), guard.get("error")
    if mode == "off" and guard.get("in_place", True) and not error:
        return ""
    if guard.get("in_place", True):
        state = f"{guard.get('policies', 0)} XFRM policies in place"
    else:
        state = f"NOT in place ({guard.get('policies', 0)} of {guard.get('wanted', 0)} XFRM policies)"
    uncovered = guard.get("uncovered") or []
    if uncovered:
        state += (f"; cannot cover {len(uncovered)} tunnel(s) on the userspace datapath, which bypasses "
                  f"XFRM: {', '.join(uncovered)}")
    return printable(f"Plaintext guard: {mode}, {state}" + (f"; {error}" if error else "")) + "\n"


def _peer(tunnel: dict) -> str:
    remote_ip = tunnel["remote_ip"] or "-"
    return f"{tunnel['remote_name']} ({remote_ip})" if tunnel.get("remote_name") else remote_ip


def _summary(tunnels: list[dict], local_ip: str | None) -> str:
    counts: dict[str, int] = {}
    for tunnel in tunnels:
        counts[tunnel["state"]] = counts.get(tunnel["state"], 0) + 1
    order = [state.value for state in (TunnelState.ESTABLISHED, TunnelState.NEGOTIATING, TunnelState.LOADED,
                                       TunnelState.PENDING, TunnelState.ERROR, TunnelState.INVALID,
                                       TunnelState.UNPROTECTED)]
    parts = ", ".join(f"{counts[state]} {state}" for state in order if state in counts)
    local = f" from {local_ip}" if local_ip else ""
    return f"{len(tunnels)} tunnel{'' if len(tunnels) == 1 else 's'}{local}" + (f": {parts}" if parts else "")


def _family(tunnel: TunnelStatus) -> str:
    if not tunnel.remote_ip:
        return "None"
    return "IPv6" if ":" in tunnel.remote_ip else "IPv4"


def _none(value: object) -> str:
    return "None" if value is None else str(value)


def _age(since: float | None, now: float) -> str:
    if since is None:
        return "-"
    seconds = max(0, int(now - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
