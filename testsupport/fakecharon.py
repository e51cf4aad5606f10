"""A VICI server in a thread that answers like charon, for unit tests of the strongSwan adapter.

It speaks the real wire protocol with vici's own encoder (vici.protocol), on a real unix socket,
so the adapter's connect, timeouts, streamed listings and error paths are what runs. It keeps
connections, shared keys and SAs in memory; `refuse[command] = "message"` makes a command fail as
charon would, `hang.add(command)` makes it never answer that command nor anything after it on the
same session (charon answers a session's requests in order).
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

from vici.protocol import FiniteStream, Message, Packet, Transport


class FakeCharon:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.conns: dict[str, dict] = {}
        self.shared: dict[str, dict] = {}
        self.sas: dict[str, dict] = {}  # IKE SA unique id -> its list-sas entry {conn name: details}
        self.keys: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.refuse: dict[str, str] = {}
        self.hang: set[str] = set()
        self._clients: list[socket.socket] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(8)
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def close(self) -> None:
        self._server.close()

    def crash(self) -> None:
        """Die as charon does on SIGKILL: the socket file stays, every connection is cut."""
        self._server.close()
        for client in self._clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()

    def establish(self, conn: str, unique_id: str, children: dict[str, str]) -> None:
        """An IKE SA of `conn` with child SAs {child name: state}."""
        self.sas[unique_id] = {conn: {"uniqueid": unique_id, "state": "ESTABLISHED", "established": "5",
                                      "child-sas": {f"{name}-{i}": {"name": name, "state": state}
                                                    for i, (name, state) in enumerate(children.items(), 1)}}}

    # -- the server ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._clients.append(client)
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, client: socket.socket) -> None:
        transport = Transport(client)
        events: set[str] = set()
        stuck = False
        try:
            while True:
                packet = transport.receive()
                kind, = struct.unpack("!B", packet[:1])
                length, = struct.unpack("!B", packet[1:2])
                name = packet[2:2 + length].decode()
                body = packet[2 + length:]
                if kind in (Packet.EVENT_REGISTER, Packet.EVENT_UNREGISTER):
                    (events.add if kind == Packet.EVENT_REGISTER else events.discard)(name)
                    transport.send(struct.pack("!B", Packet.EVENT_CONFIRM))
                    continue
                self.requests.append(name)
                stuck = stuck or name in self.hang
                if stuck:
                    continue
                message = Message.deserialize(FiniteStream(body)) if body else {}
                for event, payload in self._stream(name, message):
                    encoded = event.encode()
                    transport.send(struct.pack("!BB", Packet.EVENT, len(encoded)) + encoded
                                   + Message.serialize(payload))
                transport.send(struct.pack("!B", Packet.CMD_RESPONSE) + Message.serialize(self._answer(name, message)))
        except OSError:
            return

    def _stream(self, name: str, message: dict) -> list[tuple[str, dict]]:
        wanted = _text(message.get(b"ike") or message.get("ike")) if message else None
        if name == "list-conns":
            return [("list-conn", {conn: body}) for conn, body in self.conns.items() if wanted in (None, conn)]
        if name == "list-sas":
            return [("list-sa", sa) for sa in self.sas.values() if wanted in (None, next(iter(sa)))]
        return []

    def _answer(self, name: str, message: dict) -> dict:
        if name in self.refuse:
            return {"success": "no", "errmsg": self.refuse[name]}
        fields = {_text(k): v for k, v in message.items()}
        if name == "load-conn":
            (conn, body), = fields.items()
            self.conns[conn] = body
        elif name == "unload-conn":
            if self.conns.pop(_text(fields["name"]), None) is None:
                return {"success": "no", "errmsg": "configuration not found"}
        elif name == "load-shared":
            self.shared[_text(fields["id"])] = fields
        elif name == "unload-shared":
            self.shared.pop(_text(fields["id"]), None)
        elif name == "get-shared":
            return {"keys": list(self.shared)}
        elif name == "load-key":
            key_id = f"{len(self.keys):040x}"
            self.keys[key_id] = fields["data"]
            return {"success": "yes", "id": key_id}
        elif name == "unload-key":
            self.keys.pop(_text(fields["id"]), None)
        elif name == "terminate":
            doomed = [uid for uid, sa in self.sas.items() if _text(fields.get("ike")) == next(iter(sa))]
            if not doomed:
                return {"success": "no", "errmsg": "no matching SAs to terminate found"}
            for uid in doomed:
                del self.sas[uid]
        return {"success": "yes"}


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
