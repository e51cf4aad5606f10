"""The strongSwan adapter: charon over its VICI socket, with a timeout on every call."""

from __future__ import annotations

import hashlib
import logging
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import vici
import vici.exception
from vici.protocol import Message, Packet

from ...errors import BackendError
from ...model import ObservedSA, ObservedState, Tunnel
from ...planner import (
    Action,
    Initiate,
    LoadConn,
    LoadSecret,
    Naming,
    Peering,
    TerminateChild,
    UnloadConn,
    UnloadSecret,
)
from ..base import ActionDone, OnChange
from ..naming import is_ours
from . import parse, render

log = logging.getLogger(__name__)
T = TypeVar("T")

# Requests in flight on the session during a batch: enough that charon always has the next one
# queued while we build more, small enough that a refusal stops its chain soon.
PIPELINE_WINDOW = 64
EVENT_TYPES = ["ike-updown", "child-updown", "ike-rekey", "child-rekey"]
# Within a chain, what comes after these is sent without waiting for their answer (apply_chains).
FOLLOWED_AT_ONCE = (LoadSecret, UnloadSecret)


def socket_path(uri: str) -> str:
    if not uri.startswith("unix://"):
        raise BackendError(f"unsupported VICI URI {uri!r}: only unix:// is supported")
    return uri[len("unix://"):]


class StrongSwanBackend:
    name = "strongswan"

    def __init__(self, vici_uri: str, timeout: float = 10.0, pipeline_window: int = PIPELINE_WINDOW) -> None:
        self._path = socket_path(vici_uri)
        self._timeout = timeout
        self._window = max(1, pipeline_window)
        self._session: vici.Session | None = None
        self._daemon_id: str | None = None  # the charon process at the other end of the session
        self._loaded_keys: dict[str, str] = {}  # sha256 of key PEM -> charon key id
        self._stop = threading.Event()
        self._event_socket: socket.socket | None = None

    # charon counts the users of identical kernel policies: loading a connection's replacement
    # first means the trap policy is updated, never deleted (tests/functional/test_strongswan.py).
    make_before_break = True
    naming = Naming(conn_name=render.conn_name, secret_id=render.secret_id, child_names=render.child_names,
                    child_owner=render.child_owner)

    # -- calls ---------------------------------------------------------------------------

    def _connected(self) -> vici.Session:
        if self._session is not None and _closed_by_peer(self._session.transport.socket):
            # The charon at the other end of the kept session is gone (restarted, say): a new
            # session now, rather than a request that fails and costs the pass its retry delay
            # (UNREACHABLE_RETRY, 5 s) for nothing.
            self._drop_session()
        if self._session is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            sock.connect(self._path)
            self._daemon_id = _peer_process(sock)
            self._session = vici.Session(sock)
        return self._session

    def _call(self, what: str, func: Callable[[vici.Session], T]) -> T:
        """Run one VICI exchange; a broken or slow socket is dropped so the next call reconnects."""
        try:
            return func(self._connected())
        except vici.exception.CommandException as exc:
            raise BackendError(f"charon refused {what}: {exc}") from exc
        except (OSError, vici.exception.SessionException) as exc:
            self._drop_session()
            raise BackendError(f"charon did not answer {what} on {self._path}: {exc}", transport=True) from exc

    def _drop_session(self) -> None:
        if self._session is not None:
            try:
                self._session.transport.socket.close()
            except OSError:
                pass
        self._session = None
        self._loaded_keys.clear()  # a restarted charon has none of them

    def observe(self, conn_names: Collection[str] | None = None) -> ObservedState:
        # Blocking listing on purpose: charon raises ike-updown while the worker that established
        # the SA still holds it, and a non-blocking listing would skip exactly that SA. Replies
        # are parsed while they stream in, so thousands of them are never held at once.
        if conn_names is None:
            secrets = parse.owned_secrets(self._call("get-shared", lambda s: s.get_shared()))
            conns = self._call("list-conns", lambda s: parse.owned_conns(s.list_conns()))
            sas = self._call("list-sas", lambda s: parse.ike_sas(s.list_sas()))
            return ObservedState(conns=conns, shared_secrets=secrets, sas=sas, daemon_id=self._daemon_id)
        # a scoped look leaves secrets to the caller's cache
        conns, sas = self._scoped_listing(list(conn_names))
        return ObservedState(conns=conns, shared_secrets=frozenset(), sas=sas)

    def observe_sas(self, conn_names: Collection[str] | None = None) -> dict[str, tuple[ObservedSA, ...]]:
        """The IKE SAs of the connections (None: of all ours), nothing else: what an SA event can
        have changed. Connections and secrets change only through our own actions or behind our
        back, which the periodic full look finds; listing them again for every event during an
        establishment burst cost both monitors and both charons more than the listing of the SAs."""
        if conn_names is None:
            return self._call("list-sas", lambda s: parse.ike_sas(s.list_sas()))
        return self._scoped_listing(list(conn_names), ("list-sas",))[1]

    def _scoped_listing(self, names: list[str], commands: tuple[str, ...] = ("list-conns", "list-sas")) \
            -> tuple[dict, dict]:
        """list-conns and list-sas of each connection, pipelined like apply_chains: both event
        streams registered once, every request sent without waiting for the one before (charon
        streams a request's entries, then answers it, in order). One at a time, each listing cost
        three round trips (register, request, unregister): a burst of events about 64 connections
        was 384 of them, while charon was busy negotiating."""
        conn_events: list = []
        sa_events: list = []
        what = f"list-conns/list-sas of {len(names)} connection(s)"
        requests = [(command, {"ike": name}) for name in names for command in commands]
        streams = tuple(command[:-1] for command in commands)  # list-conns streams list-conn events
        try:
            transport = self._connected().transport
            for stream in streams:
                transport.send(Packet.register_event(stream))
            awaited = len(streams)  # replies still to come: confirmations, then one per request
            sent = 0
            while awaited or sent < len(requests):
                if sent < len(requests) and awaited < self._window:
                    command, message = requests[sent]
                    transport.send(Packet.request(command, Message.serialize(message)))
                    sent += 1
                    awaited += 1
                    continue
                packet = Packet.parse(transport.receive())
                if packet.response_type == Packet.EVENT:
                    kind = packet.event_type
                    (conn_events if kind == b"list-conn" else sa_events).append(Message.deserialize(packet.payload))
                elif packet.response_type in (Packet.CMD_RESPONSE, Packet.EVENT_CONFIRM):
                    awaited -= 1
                else:
                    raise vici.exception.SessionException(f"unexpected VICI packet type {packet.response_type}")
            for stream in streams:
                transport.send(Packet.unregister_event(stream))
            for _ in streams:
                if Packet.parse(transport.receive()).response_type != Packet.EVENT_CONFIRM:
                    raise vici.exception.SessionException("event stream not unregistered")
        except (OSError, vici.exception.SessionException, vici.exception.DeserializationException) as exc:
            self._drop_session()
            raise BackendError(f"charon did not answer {what} on {self._path}: {exc}", transport=True) from exc
        return parse.owned_conns(conn_events), parse.ike_sas(sa_events)

    def flush(self) -> Mapping[str, BackendError]:
        """Nothing is deferred: every VICI call takes effect at once."""
        return {}

    def apply(self, action: Action) -> None:
        def raise_failure(_: Action, error: Exception | None) -> None:
            if error is not None:
                raise error
        self.apply_chains([[action]], raise_failure)

    def apply_chains(self, chains: Sequence[Sequence[Action]], done: ActionDone) -> None:
        """Pipeline the chains' requests on the one session, up to `pipeline_window` in flight.

        charon handles a session's requests one after the other and answers them in order, so a
        reply is matched to its request by position, and an action sent after another is carried
        out after it. Loading one request at a time left charon idle while we waited for its answer
        and then built the next request (half of a bulk load's time). Within a chain, an action is
        sent only once the previous one succeeded, except after a secret: its connection follows it
        at once, which puts a new tunnel in charon, or takes a deleted one out, a round trip sooner.
        A connection whose secret was refused fails closed (charon cannot authenticate it, and its
        trap policies hold the traffic), the refusal is reported and the secret retried; one that
        is removed is wanted gone whatever became of its secret. Chains are independent, and one
        failing leaves the others going. Every reply must come within the session's timeout of the
        previous one (the socket's timeout, on every read).
        """
        ready: deque[tuple[int, int]] = deque((i, 0) for i, chain in enumerate(chains) if chain)
        in_flight: deque[_InFlight] = deque()
        refusals: dict[tuple[int, int], BackendError] = {}
        stopped: set[int] = set()  # chains with a refusal

        def settle_oldest() -> None:
            entry = in_flight.popleft()
            key = (entry.chain, entry.position)
            error = self._reply_error(self._receive(entry.request.what))
            if error is not None and not entry.request.absent_ok:
                refusals.setdefault(key, BackendError(f"charon refused {entry.request.what}: {error}"))
            if entry.last:
                refusal = refusals.pop(key, None)
                action = chains[entry.chain][entry.position]
                done(action, refusal)
                if refusal is not None:
                    stopped.add(entry.chain)  # what follows a sent connection still goes no further
                elif entry.chain not in stopped and not isinstance(action, FOLLOWED_AT_ONCE) \
                        and entry.position + 1 < len(chains[entry.chain]):
                    # A chain under way goes on before new ones start: its connection is complete
                    # (and initiated) as soon as charon allows, not after every other one's loads.
                    ready.appendleft((entry.chain, entry.position + 1))

        try:
            while ready or in_flight:
                if not ready or len(in_flight) >= self._window:
                    settle_oldest()
                    continue
                chain, position = ready.popleft()
                action = chains[chain][position]
                try:
                    if isinstance(action, LoadConn) and self._needs_key(action):
                        while in_flight:  # load-key's reply is read at once: nothing may be ahead of it
                            settle_oldest()
                        self._ensure_key(action.peering.tunnels[0].local_key_pem or b"")
                    requests = _requests(action)
                except BackendError as exc:
                    if exc.transport:
                        raise
                    done(action, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - a bug rendering one action costs one connection
                    done(action, exc)
                    continue
                for n, request in enumerate(requests):
                    self._send(request, idle=not in_flight)
                    in_flight.append(_InFlight(chain, position, request, last=n == len(requests) - 1))
                if isinstance(action, FOLLOWED_AT_ONCE) and position + 1 < len(chains[chain]):
                    ready.appendleft((chain, position + 1))  # its connection next, without waiting
        except BaseException:
            if in_flight:
                self._drop_session()  # unread replies would answer the next requests
            raise

    def _send(self, request: _Request, idle: bool) -> None:
        """`idle`: no reply is awaited, so a session its charon closed may be replaced first; with
        replies awaited the kept session is used as it is (a poll per request would be wasted)."""
        try:
            packet = Packet.request(request.command, Message.serialize(request.message))
            session = self._session if self._session is not None and not idle else self._connected()
            session.transport.send(packet)
        except (OSError, vici.exception.SessionException) as exc:
            self._drop_session()
            raise BackendError(f"charon did not take {request.what} on {self._path}: {exc}", transport=True) from exc

    def _receive(self, what: str) -> dict:
        try:
            session = self._session
            if session is None:
                raise vici.exception.SessionException("session closed")
            reply = Packet.parse(session.transport.receive())
            if reply.response_type != Packet.CMD_RESPONSE:
                raise vici.exception.SessionException(f"unexpected VICI packet type {reply.response_type}")
            return Message.deserialize(reply.payload)
        except (OSError, vici.exception.SessionException, vici.exception.DeserializationException) as exc:
            self._drop_session()
            raise BackendError(f"charon did not answer {what} on {self._path}: {exc}", transport=True) from exc

    @staticmethod
    def _reply_error(reply: dict) -> str | None:
        if reply.get("success", b"yes") == b"yes":
            return None
        return parse.text(reply.get("errmsg", b"")) or "no reason given"

    def _needs_key(self, action: LoadConn) -> bool:
        key_pem = action.peering.tunnels[0].local_key_pem
        return bool(key_pem) and hashlib.sha256(key_pem or b"").hexdigest() not in self._loaded_keys

    def _ensure_key(self, key_pem: bytes) -> None:
        digest = hashlib.sha256(key_pem).hexdigest()
        if digest in self._loaded_keys:
            return
        reply = self._call("load-key", lambda s: s.load_key({"type": "any", "data": key_pem.decode()}))
        self._loaded_keys[digest] = parse.load_key_id(reply) or ""

    def not_applicable(self, tunnel: Tunnel) -> tuple[tuple[str, str], ...]:
        return render.not_applicable(tunnel.options)

    def cleanup_credentials(self, peerings: Collection[Peering]) -> None:
        if not self._loaded_keys:
            return  # PSK only: nothing to look for among (thousands of) peerings
        keep = {hashlib.sha256(p.tunnels[0].local_key_pem).hexdigest() for p in peerings if p.tunnels[0].local_key_pem}
        for digest, key_id in list(self._loaded_keys.items()):
            if digest not in keep:
                if key_id:
                    self._call("unload-key", _command("unload_key", {"id": key_id}))
                del self._loaded_keys[digest]

    # -- events ------------------------------------------------------------------------------

    def start_events(self, on_change: OnChange) -> None:
        thread = threading.Thread(target=self._listen, args=(on_change,), name="vici-events", daemon=True)
        thread.start()

    def _listen(self, on_change: OnChange) -> None:
        """Forward SA events; a lost socket means charon restarted: ask for a full resync."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._timeout)
                sock.connect(self._path)
                session = vici.Session(sock)
                self._event_socket = sock
                # No timeout: an idle monitor must not wake up. close() shuts the socket down to
                # end the wait, and a charon that dies closes it too.
                listener = session.listen(EVENT_TYPES, timeout=None)
                on_change(None)  # (re)connected: whatever happened meanwhile, look at everything
                delay = 0.5
                for label, message in listener:
                    if self._stop.is_set():
                        break
                    if label is not None:
                        names = frozenset(filter(is_ours, parse.event_conn_names(message)))
                        if not names:
                            continue  # someone else's SA: none of our business
                        log.debug("VICI event %s about %s", parse.text(label), ", ".join(sorted(names)))
                        # What the event says in full spares the worker a look at charon (one
                        # list-sas per event, each a walk over every IKE SA, during a burst).
                        on_change(names, parse.event_sas(parse.text(label), message))
            except (OSError, vici.exception.SessionException) as exc:
                log.debug("VICI event socket %s: %s", self._path, exc)
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self._stop.set()
        if self._event_socket is not None:
            try:
                self._event_socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._drop_session()


@dataclass(frozen=True)
class _Request:
    """One VICI request of an action."""

    command: str
    message: dict
    what: str  # for errors: the command and whom it is about
    absent_ok: bool = False  # terminate: "no matching SAs" is what we wanted


@dataclass(frozen=True)
class _InFlight:
    chain: int
    position: int
    request: _Request
    last: bool  # the action's last request: its reply settles the action


def _requests(action: Action) -> list[_Request]:
    """The requests that carry out an action, in order. initiate and terminate are sent without
    registering for their log stream: with timeout -1 charon answers at once, and the outcome
    arrives as an ike-updown event on the event session."""
    if isinstance(action, LoadSecret):
        peering = action.peering
        first = peering.tunnels[0]
        owners = [ip for ip in (first.local_ip, first.remote_ip) if ip]
        return [_Request("load-shared", {"id": peering.secret_id, "type": "IKE", "data": peering.psk,
                                         "owners": owners}, f"load-shared {peering.secret_id}")]
    if isinstance(action, UnloadSecret):
        return [_Request("unload-shared", {"id": action.secret_id}, f"unload-shared {action.secret_id}")]
    if isinstance(action, LoadConn):
        return [_Request("load-conn", render.render_conn(action.peering), f"load-conn {action.peering.conn_name}")]
    if isinstance(action, UnloadConn):
        # charon keeps the SAs of an unloaded connection alive; end them so no SA outlives the
        # parameters the operator removed.
        return [_Request("unload-conn", {"name": action.conn_name}, f"unload-conn {action.conn_name}"),
                _Request("terminate", {"ike": action.conn_name, "timeout": "-1"}, f"terminate {action.conn_name}",
                         absent_ok=True)]
    if isinstance(action, TerminateChild):
        return [_Request("terminate", {"child": action.child, "timeout": "-1"},
                         f"terminate {action.conn_name}/{action.child}", absent_ok=True)]
    if isinstance(action, Initiate):
        return [_Request("initiate", {"ike": action.conn_name, "child": action.child, "timeout": "-1"},
                         f"initiate {action.conn_name}/{action.child}")]
    raise TypeError(f"unknown action {action!r}")


def _command(method: str, message: dict) -> Callable[[vici.Session], object]:
    return lambda session: getattr(session, method)(message)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the other end has closed the session (end of file waiting to be read): one poll,
    no wait. Replies still to be read are not an end of file."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _peer_process(sock: socket.socket) -> str | None:
    """Which charon answers on the socket: its pid (SO_PEERCRED) and that process's start time, so a
    restarted charon, even one given the same pid, is told apart. (VICI's own `stats` uptime.since is
    computed from the current time and jitters by a second between two calls.)"""
    try:
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    except OSError:
        return None
    if pid <= 0:
        return None  # charon in a pid namespace we cannot see
    try:
        with open(f"/proc/{pid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{pid}@{started}"
