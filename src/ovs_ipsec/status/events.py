"""Events: one line per change that an operator (or a log pipeline) cares about.

Pure core: two consecutive status snapshots in, a tuple of `Event` values out, and two formats:
logfmt for the monitor's log (`event=tunnel_up tunnel=gnv0 peer=10.0.0.2 ...`, readable and
parseable) and one JSON object per line for `--events-file`. Only the `EventLog` adapter writes.

Nothing secret can appear: events are built from status snapshots, which hold no PSK and no key,
only names, addresses, states, reasons and certificate paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import IO

from ..model import TunnelState
from .snapshot import StatusSnapshot, TunnelStatus

EVENTS_FILE_MODE = 0o640
# A certificate is worth an event this long before it ends.
EXPIRY_WARNING_DAYS = 30

_EVENT_OF_STATE = {
    TunnelState.ESTABLISHED: "tunnel_up",
    TunnelState.NEGOTIATING: "tunnel_negotiating",
    TunnelState.INVALID: "tunnel_invalid",
    TunnelState.ERROR: "tunnel_error",
    TunnelState.LOADED: "tunnel_loaded",
    TunnelState.PENDING: "tunnel_pending",
    TunnelState.UNPROTECTED: "tunnel_unprotected",
}
# Events an operator should look at; the rest is progress.
WARNING_EVENTS = frozenset({"tunnel_down", "tunnel_invalid", "tunnel_unprotected", "tunnel_error",
                            "certificate_expiring", "tunnel_options_ignored", "not_all_tunnels_encrypting"})
_BARE_VALUE = re.compile(r"[A-Za-z0-9_.:/@%+,-]+")

Value = str | int | float | bool | None


@dataclass(frozen=True)
class Event:
    kind: str  # tunnel_up | tunnel_negotiating | tunnel_down | tunnel_invalid | tunnel_error | tunnel_loaded
    #            | tunnel_pending | tunnel_unprotected | tunnel_removed | tunnel_rekeyed | tunnel_options_ignored
    #            | all_tunnels_encrypting | not_all_tunnels_encrypting | certificate_expiring
    at: float
    fields: tuple[tuple[str, Value], ...]  # in the order they are printed; None values are left out

    @property
    def warning(self) -> bool:
        return self.kind in WARNING_EVENTS

    def as_json(self) -> dict:
        return {"event": self.kind, "at": _iso(self.at),
                **{key: value for key, value in self.fields if value is not None}}


def events_between(previous: StatusSnapshot, current: StatusSnapshot, now: float) -> tuple[Event, ...]:
    """What changed from one snapshot to the next: state changes (a change of reason within a state
    counts), removals, rekeys, certificates entering their last days. Each is reported once."""
    return (_tunnel_events(previous, current, now) + _encrypting_events(previous, current, now)
            + _certificate_events(previous, current, now))


def _tunnel_events(previous: StatusSnapshot, current: StatusSnapshot, now: float) -> tuple[Event, ...]:
    before = {tunnel.name: tunnel for tunnel in previous.tunnels}
    events = []
    for tunnel in current.tunnels:
        old = before.pop(tunnel.name, None)
        if old is None or (old.state, old.reason) != (tunnel.state, tunnel.reason):
            was = old.state if old is not None else None
            kind = _EVENT_OF_STATE[tunnel.state]
            if old is not None and old.ike_sas and tunnel.state in (TunnelState.LOADED, TunnelState.PENDING):
                kind = "tunnel_down"
            events.append(Event(kind, now, _tunnel_fields(tunnel, was)))
        elif tunnel.rekeys > old.rekeys:
            events.append(Event("tunnel_rekeyed", now, _tunnel_fields(tunnel, old.state)
                                + (("rekeys", tunnel.rekeys),)))
        ignored_before = old.ignored_options if old is not None else ()
        if tunnel.ignored_options and tunnel.ignored_options != ignored_before:
            events.append(Event("tunnel_options_ignored", now, (
                ("tunnel", tunnel.name),
                ("options", ",".join(key for key, _why in tunnel.ignored_options)),
                ("why", "; ".join(f"{key}: {why}" for key, why in tunnel.ignored_options)))))
    for name, old in sorted(before.items()):
        events.append(Event("tunnel_removed", now, (("tunnel", name), ("from", old.state.value),
                                                    ("peer", old.remote_ip), ("conn", old.conn))))
    return tuple(events)


def _tunnel_fields(tunnel: TunnelStatus, was: TunnelState | None) -> tuple[tuple[str, Value], ...]:
    return (
        ("tunnel", tunnel.name), ("state", tunnel.state.value), ("from", was.value if was else None),
        ("peer", tunnel.remote_ip), ("remote_name", tunnel.remote_name), ("type", tunnel.type),
        ("auth", tunnel.auth), ("conn", tunnel.conn),
        ("ike_sas", tunnel.ike_sas if tunnel.ike_sas else None),
        ("child_sas", tunnel.child_sas if tunnel.ike_sas else None),
        ("since", _iso(tunnel.since) if tunnel.since is not None else None), ("reason", tunnel.reason),
        ("last_good_kept", True if tunnel.last_good_since is not None else None),
    )


def _encrypting_events(previous: StatusSnapshot, current: StatusSnapshot, now: float) -> tuple[Event, ...]:
    """One line when every configured tunnel is encrypting again, one when that stops being so
    (what a cluster's health check greps for)."""
    before, after = _all_encrypting(previous), _all_encrypting(current)
    if after and not before:
        count = len(current.tunnels)
        # Upstream's own words first: OpenShift's CI greps the log for "Connections for all(N)".
        return (Event("all_tunnels_encrypting", now, (
            ("tunnels", count), ("message", f"Connections for all({count}) configured tunnels are Up: "
                                            f"all {count} configured tunnels are encrypting"))),)
    if before and not after and current.tunnels:
        waiting = sorted(t.name for t in current.tunnels if not t.encrypting)
        return (Event("not_all_tunnels_encrypting", now, (
            ("tunnels", len(current.tunnels)), ("not_encrypting", ",".join(waiting) or None),
            ("message", f"{len(waiting)} of {len(current.tunnels)} configured tunnels are not encrypting"))),)
    return ()


def _all_encrypting(snapshot: StatusSnapshot) -> bool:
    return bool(snapshot.tunnels) and all(tunnel.encrypting for tunnel in snapshot.tunnels)


def _certificate_events(previous: StatusSnapshot, current: StatusSnapshot, now: float) -> tuple[Event, ...]:
    warned_before = {(c.path, c.not_after) for c in previous.certificates
                     if _expiring(c.not_after, previous.taken_at or now)}
    events = []
    for certificate in current.certificates:
        not_after = certificate.not_after
        if not_after is not None and _expiring(not_after, now) and (certificate.path, not_after) not in warned_before:
            days_left = (not_after - now) / 86400
            events.append(Event("certificate_expiring", now, (
                ("path", certificate.path), ("role", certificate.role), ("cn", certificate.cn),
                ("not_after", _iso(not_after)), ("days_left", round(days_left, 1)))))
    return tuple(events)


def _expiring(not_after: float | None, now: float) -> bool:
    return not_after is not None and not_after - now <= EXPIRY_WARNING_DAYS * 86400


# -- formats ---------------------------------------------------------------------------------------

def logfmt(event: Event) -> str:
    """`event=KIND key=value ...`: values with spaces, quotes or `=` are quoted, JSON-style."""
    pairs = [("event", event.kind), *event.fields]
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in pairs if value is not None)


def json_line(event: Event) -> str:
    return json.dumps(event.as_json(), sort_keys=False, separators=(",", ":"))


def _logfmt_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text if _BARE_VALUE.fullmatch(text) else json.dumps(text)


def _iso(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


# -- the adapter -------------------------------------------------------------------------------------

class EventLog:
    """Writes events to the monitor's log (logfmt) and, optionally, to a JSON-lines file.

    Called from the reconciler's thread only. The file is opened for appending and flushed per
    line, so `tail -f` and log shippers see each event as it happens.
    """

    def __init__(self, logger: logging.Logger, path: str | None = None) -> None:
        self._logger = logger
        self._path = path
        self._file: IO[str] | None = None

    def emit(self, events: tuple[Event, ...]) -> None:
        for event in events:
            self._logger.log(logging.WARNING if event.warning else logging.INFO, "%s", logfmt(event))
            if self._path is not None:
                self._write_json(event)

    def _write_json(self, event: Event) -> None:
        if self._path is None:
            return
        try:
            if self._file is None:
                self._file = open_events_file(self._path)
            self._file.write(json_line(event) + "\n")
            self._file.flush()
        except OSError as exc:  # an unwritable events file must not stop the reconciler
            self._logger.error("cannot write the events file %s: %s", self._path, exc)
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_events_file(path: str) -> IO[str]:
    """Append-only, mode 0640 when created, and never through a symbolic link: the daemon runs as
    root, and a link planted at the path must not make it write somewhere else."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, EVENTS_FILE_MODE)
    return os.fdopen(fd, "a", encoding="utf-8")
