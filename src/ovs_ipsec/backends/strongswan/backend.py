"""The strongSwan adapter: charon over its VICI socket, with a timeout on every call."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection

import vici
import vici.exception

from ...errors import BackendError
from ...model import ObservedState, Tunnel
from ...planner import Action, Initiate, LoadConn, LoadSecret, UnloadConn, UnloadSecret
from . import parse, render

log = logging.getLogger(__name__)

EVENT_TYPES = ["ike-updown", "child-updown", "ike-rekey", "child-rekey"]


def socket_path(uri: str) -> str:
    if not uri.startswith("unix://"):
        raise BackendError(f"unsupported VICI URI {uri!r}: only unix:// is supported")
    return uri[len("unix://"):]


class StrongSwanBackend:
    name = "strongswan"

    def __init__(self, vici_uri: str, timeout: float = 10.0) -> None:
        self._path = socket_path(vici_uri)
        self._timeout = timeout
        self._session: vici.Session | None = None
        self._loaded_keys: dict[str, str] = {}  # sha256 of key PEM -> charon key id
        self._stop = threading.Event()

    # -- naming (pure) ---------------------------------------------------------------------

    def conn_name(self, tunnel: Tunnel) -> str:
        return render.render_conn(tunnel)[0]

    def secret_id(self, tunnel: Tunnel) -> str | None:
        return render.secret_id(tunnel.name) if tunnel.psk is not None else None

    def children(self, tunnel: Tunnel) -> tuple[str, ...]:
        return render.child_names(tunnel)

    # -- calls ---------------------------------------------------------------------------

    def _call(self, what: str, func: Callable[[vici.Session], object]) -> object:
        """Run one VICI exchange; a broken or slow socket is dropped so the next call reconnects."""
        try:
            if self._session is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._timeout)
                sock.connect(self._path)
                self._session = vici.Session(sock)
            return func(self._session)
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
        conns = parse.owned_names(self._call("get-conns", lambda s: s.get_conns()), "conns")
        secrets = parse.owned_names(self._call("get-shared", lambda s: s.get_shared()), "keys")
        if conn_names is None:
            sas = parse.ike_sas(self._call("list-sas", lambda s: list(s.list_sas({"noblock": "yes"}))))
        else:
            sas = {}
            for name in conn_names:
                sas.update(parse.ike_sas(self._call(f"list-sas {name}",
                                                    lambda s, n=name: list(s.list_sas({"noblock": "yes", "ike": n})))))
        owners = {name: render.tunnel_of_conn(name) or "" for name in conns}
        owners.update({name: render.tunnel_of_secret(name) or "" for name in secrets})
        return ObservedState(conns=conns, shared_secrets=secrets, sas=sas, owners=owners)

    def apply(self, action: Action) -> None:
        if isinstance(action, LoadSecret):
            tunnel = action.tunnel
            owners = [ip for ip in (tunnel.local_ip, tunnel.remote_ip) if ip]
            self._call(f"load-shared {action.secret_id}", lambda s: s.load_shared(
                {"id": action.secret_id, "type": "IKE", "data": tunnel.psk, "owners": owners}))
        elif isinstance(action, UnloadSecret):
            self._call(f"unload-shared {action.secret_id}", lambda s: s.unload_shared({"id": action.secret_id}))
        elif isinstance(action, LoadConn):
            if action.tunnel.local_key_pem:
                self._ensure_key(action.tunnel.local_key_pem)
            name, body = render.render_conn(action.tunnel)
            self._call(f"load-conn {name}", lambda s: s.load_conn({name: body}))
        elif isinstance(action, UnloadConn):
            self._call(f"unload-conn {action.conn_name}", lambda s: s.unload_conn({"name": action.conn_name}))
            # charon keeps the SAs of an unloaded connection alive; end them so no SA outlives
            # the parameters the operator removed.
            self._terminate(action.conn_name)
        elif isinstance(action, Initiate):
            # timeout -1: charon answers at once; the outcome arrives as an ike-updown event.
            self._call(f"initiate {action.conn_name}/{action.child}", lambda s: _drain(s.initiate(
                {"ike": action.conn_name, "child": action.child, "timeout": "-1"})))
        else:
            raise TypeError(f"unknown action {action!r}")

    def _terminate(self, conn_name: str) -> None:
        try:
            self._call(f"terminate {conn_name}", lambda s: _drain(s.terminate({"ike": conn_name, "timeout": "-1"})))
        except BackendError as exc:
            if exc.transport:
                raise
            # "no matching SAs": nothing was up, which is what we wanted.

    def _ensure_key(self, key_pem: bytes) -> None:
        digest = hashlib.sha256(key_pem).hexdigest()
        if digest in self._loaded_keys:
            return
        reply = self._call("load-key", lambda s: s.load_key({"type": "any", "data": key_pem.decode()}))
        self._loaded_keys[digest] = parse.load_key_id(reply) or ""

    def cleanup_credentials(self, keep_keys: Collection[bytes]) -> None:
        keep = {hashlib.sha256(pem).hexdigest() for pem in keep_keys}
        for digest, key_id in list(self._loaded_keys.items()):
            if digest not in keep:
                if key_id:
                    self._call("unload-key", lambda s, k=key_id: s.unload_key({"id": k}))
                del self._loaded_keys[digest]

    # -- events ------------------------------------------------------------------------------

    def start_events(self, on_change: Callable[[frozenset[str] | None], None]) -> None:
        thread = threading.Thread(target=self._listen, args=(on_change,), name="vici-events", daemon=True)
        thread.start()

    def _listen(self, on_change: Callable[[frozenset[str] | None], None]) -> None:
        """Forward SA events; a lost socket means charon restarted: ask for a full resync."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._timeout)
                sock.connect(self._path)
                session = vici.Session(sock)
                listener = session.listen(EVENT_TYPES, timeout=1.0)
                on_change(None)  # (re)connected: whatever happened meanwhile, look at everything
                delay = 0.5
                for label, message in listener:
                    if self._stop.is_set():
                        break
                    if label is not None:
                        on_change(parse.event_conn_names(message))
            except (OSError, vici.exception.SessionException) as exc:
                log.debug("VICI event socket %s: %s", self._path, exc)
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self._stop.set()
        self._drop_session()


def _drain(stream) -> None:
    """VICI's streamed commands do nothing until iterated."""
    for _ in stream:
        pass
