"""Metrics in Prometheus' text exposition format (version 0.0.4), written directly.

Pure core: `render_metrics(snapshot, queue_depth, now)` turns a status snapshot into text. The
adapter, `MetricsServer`, serves it over HTTP on an address the operator chose (`--metrics-address`);
`ovs-appctl -t ovs-monitor-ipsec metrics/show` prints the same text without any network listener.

Only names, addresses, states, counts and times appear: never a key or a PSK.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import OvsIpsecError
from ..model import TunnelState
from ..text import printable
from .snapshot import StatusSnapshot, TunnelStatus

if TYPE_CHECKING:
    import http.server

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request or read the answer
PREFIX = "ovs_ipsec_"


@dataclass(frozen=True)
class Family:
    """One metric family: its HELP and TYPE lines, then its samples."""

    name: str
    kind: str  # gauge | counter | summary
    help: str
    samples: tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]  # (suffix, labels, value)

    def render(self) -> str:
        lines = [f"# HELP {PREFIX}{self.name} {self.help}", f"# TYPE {PREFIX}{self.name} {self.kind}"]
        for suffix, labels, value in self.samples:
            label_text = ",".join(f'{key}="{_escape(text)}"' for key, text in labels)
            lines.append(f"{PREFIX}{self.name}{suffix}{{{label_text}}} {_number(value)}" if labels
                         else f"{PREFIX}{self.name}{suffix} {_number(value)}")
        return "\n".join(lines) + "\n"


def render_metrics(snapshot: StatusSnapshot, queue_depth: int, now: float) -> str:
    return "".join(family.render() for family in metric_families(snapshot, queue_depth, now))


def metric_families(snapshot: StatusSnapshot, queue_depth: int, now: float) -> tuple[Family, ...]:
    tunnels = snapshot.tunnels
    reconcile = snapshot.reconcile
    return (
        _per_tunnel("tunnel_info", "gauge", "Tunnel parameters as labels (always 1).", tunnels,
                    lambda t: 1.0, extra=lambda t: (("type", t.type), ("auth", t.auth or ""),
                                                    ("local_ip", t.local_ip or ""),
                                                    ("remote_name", t.remote_name or ""), ("conn", t.conn or ""))),
        Family("tunnel_state", "gauge", "1 for the tunnel's current state, 0 for the others.", tuple(
            ("", _labels(t) + (("state", state.value),), float(t.state is state))
            for t in tunnels for state in TunnelState)),
        _per_tunnel("tunnel_encrypting", "gauge",
                    "1 when every child SA of the tunnel is installed: its traffic is encrypted.", tunnels,
                    lambda t: t.encrypting),
        _per_tunnel("tunnel_last_good_kept", "gauge",
                    "1 while the tunnel is invalid and its last good configuration stays in force.", tunnels,
                    lambda t: t.last_good_since is not None),
        _per_tunnel("tunnel_ignored_options", "gauge",
                    "ipsec_* options set on the tunnel that have no effect with this monitor.", tunnels,
                    lambda t: len(t.ignored_options)),
        _per_tunnel("tunnel_ike_sas", "gauge", "Established IKE SAs of the tunnel's connection.", tunnels,
                    lambda t: t.ike_sas),
        _per_tunnel("tunnel_child_sas", "gauge", "Installed child SAs of the tunnel.", tunnels,
                    lambda t: t.child_sas),
        _per_tunnel("tunnel_rekeys_total", "counter",
                    "IKE SAs replaced while established (rekey or reauthentication) since the monitor started.",
                    tunnels, lambda t: t.rekeys),
        _per_tunnel("tunnel_failures_total", "counter",
                    "Times the tunnel entered error or lost its IKE SA, since the monitor started.",
                    tunnels, lambda t: t.failures),
        _per_tunnel("tunnel_established_seconds", "gauge",
                    "Seconds since the tunnel's current IKE SA was established (absent when not established).",
                    [t for t in tunnels if t.established_at is not None],
                    lambda t: max(0.0, now - (t.established_at or now))),
        _per_tunnel("tunnel_state_since_timestamp_seconds", "gauge",
                    "When the tunnel entered its current state (Unix time).",
                    [t for t in tunnels if t.since is not None], lambda t: t.since or 0.0),
        Family("tunnels", "gauge", "Tunnels per state.", tuple(
            ("", (("state", state.value),), float(sum(t.state is state for t in tunnels))) for state in TunnelState)),
        Family("ike_daemon_up", "gauge", "1 when the IKE daemon answered the last call.",
               (("", (), float(snapshot.ike_daemon_error is None)),)),
        Family("reconcile_duration_seconds", "summary", "Time spent in reconcile passes.",
               (("_sum", (), reconcile.total_pass_seconds), ("_count", (), float(reconcile.passes)))),
        Family("reconcile_last_duration_seconds", "gauge", "Duration of the last reconcile pass.",
               (("", (), reconcile.last_pass_seconds),)),
        Family("reconcile_queue_depth", "gauge", "Dirty connections waiting for the reconciler.",
               (("", (), float(queue_depth)),)),
        Family("reconcile_errors_total", "counter", "Reconcile passes that failed unexpectedly (and were retried).",
               (("", (), float(reconcile.errors)),)),
        Family("reconcile_retry_waiting", "gauge", "Connections waiting for their retry delay (backoff).",
               (("", (), float(reconcile.retry_waiting)),)),
        Family("last_full_resync_timestamp_seconds", "gauge",
               "When the IKE daemon was last compared in full (Unix time; absent before the first).",
               (("", (), reconcile.last_full_resync),) if reconcile.last_full_resync is not None else ()),
        Family("status_timestamp_seconds", "gauge", "When the status these metrics come from was taken.",
               (("", (), snapshot.taken_at),) if snapshot.taken_at is not None else ()),
        Family("certificate_expiry_timestamp_seconds", "gauge",
               "When each certificate in use ends (notAfter, Unix time).", tuple(
                   ("", (("path", c.path), ("role", c.role), ("cn", c.cn or "")), c.not_after)
                   for c in snapshot.certificates if c.not_after is not None)),
    )


def _per_tunnel(name: str, kind: str, help_text: str, tunnels: Iterable[TunnelStatus],
                value: Callable[[TunnelStatus], float],
                extra: Callable[[TunnelStatus], tuple[tuple[str, str], ...]] = lambda t: ()) -> Family:
    return Family(name, kind, help_text, tuple(("", _labels(t) + extra(t), float(value(t))) for t in tunnels))


def _labels(tunnel: TunnelStatus) -> tuple[tuple[str, str], ...]:
    return (("tunnel", tunnel.name), ("peer", tunnel.remote_ip or ""))


def _escape(text: str) -> str:
    """Prometheus escapes backslash, quote and newline; any other unprintable character (a value
    from OVSDB may hold terminal escape sequences) is written as a literal, visible escape."""
    if text.isprintable() and "\\" not in text and '"' not in text:
        return text
    return "".join(_LABEL_ESCAPES.get(char) or (char if char.isprintable() else "\\" + printable(char))
                   for char in text)


_LABEL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n"}


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


# -- the adapter -------------------------------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (loopback: metrics are served to the world only when the
    operator names an address that reaches it, such as 0.0.0.0 or ::)."""
    host, sep, port = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise OvsIpsecError(f"--metrics-address {text!r}: expected HOST:PORT, [IPV6]:PORT or :PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class MetricsServer:
    """`GET /metrics` over HTTP, in its own thread, from whatever `render()` returns at that moment.

    The socket is bound at construction, so a bad address is reported before the monitor detaches;
    requests are served from `start()` on (after the fork: threads do not survive it). `render`
    must be safe to call from the server's threads: the monitor passes a function that reads the
    reconciler's last published snapshot (an immutable value) and its queue depth (under its lock).
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self._render: Callable[[], str] = lambda: ""
        server_class = _server_class(address[0])
        try:
            self._server = server_class(address, _handler_for(lambda: self._render()))
        except OSError as exc:
            raise OvsIpsecError(f"cannot serve metrics on {address[0]}:{address[1]}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self, render: Callable[[], str]) -> None:
        self._render = render
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _server_class(host: str) -> type[http.server.ThreadingHTTPServer]:
    """The server class for this address family. Built here, on first use, because `http.server`
    brings 36 modules (email, html, http.client, ...) and 2.7 MB of RSS: a monitor without
    --metrics-address should not pay for them."""
    import http.server

    class BoundedServer(http.server.ThreadingHTTPServer):
        """At most MAX_CONNECTIONS requests at a time, each with a deadline: a scraper that connects
        and says nothing, or a thousand of them, cannot hold threads or memory of the daemon forever."""

        daemon_threads = True

        def __init__(self, *args, **kwargs) -> None:
            self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
            super().__init__(*args, **kwargs)

        def process_request(self, request, client_address) -> None:
            if not self._slots.acquire(blocking=False):
                self.shutdown_request(request)  # over the cap: closed at once
                return
            request.settimeout(REQUEST_TIMEOUT)
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

    if ":" not in host:
        return BoundedServer

    class V6Server(BoundedServer):
        address_family = socket.AF_INET6

    return V6Server


def _handler_for(render: Callable[[], str]) -> type[http.server.BaseHTTPRequestHandler]:
    import http.server

    class MetricsHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics is served here")
                return
            body = render().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:  # scrapes are not worth a log line each
            pass

    return MetricsHandler
