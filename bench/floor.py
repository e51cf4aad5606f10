"""The floor: a plain script that loads the same connections straight into charon over VICI.

Per tunnel it sends what our monitor sends for a Geneve PSK tunnel that is its own peering: one
load-shared (the PSK, owned by both addresses) and one load-conn carrying the tunnel's two
transport-mode children (in: local udp/6081, out: remote udp/6081) with start_action=trap, the
same proposals, DPD and identities, over one VICI session, one call after the other. No OVSDB,
no validation, no planning: what is left is charon's own cost plus the Python vici client's.

Driven over stdin/stdout by bench/run.py, one command per line:
    load FIRST LAST   add K   del K   quit
Each answers `start <wall time>` before its first VICI call and `done <wall time> <cpu s>` after the
last. Standalone: `python bench/floor.py VICI_SOCKET LOCAL_IP [REMOTE_BASE]`, then type commands.
"""

from __future__ import annotations

import socket
import sys
import time

import vici

from common import PSK, remote_ip

IKE_PROPOSAL = "aes256gcm16-sha256-modp2048"
ESP_PROPOSAL = "aes256gcm16-modp2048"
GENEVE_PORT = 6081


def conn_name(remote: str) -> str:
    return f"floor-{remote}"


def child(local_ts: str, remote_ts: str) -> dict:
    return {"mode": "transport", "local_ts": [local_ts], "remote_ts": [remote_ts],
            "esp_proposals": [ESP_PROPOSAL], "start_action": "trap", "dpd_action": "trap"}


def messages(index: int, local: str, remote_base: str) -> tuple[dict, dict]:
    remote = remote_ip(index, remote_base)
    name = conn_name(remote)
    secret = {"id": name, "type": "IKE", "data": PSK, "owners": [local, remote]}
    conn = {name: {
        "version": "2", "local_addrs": [local], "remote_addrs": [remote], "proposals": [IKE_PROPOSAL],
        "encap": "no", "dpd_delay": "30s",
        "local": {"auth": "psk", "id": local}, "remote": {"auth": "psk", "id": remote},
        "children": {f"gnv{index}-in": child(f"dynamic[udp/{GENEVE_PORT}]", "dynamic[udp]"),
                     f"gnv{index}-out": child("dynamic[udp]", f"dynamic[udp/{GENEVE_PORT}]")},
    }}
    return secret, conn


def main(argv: list[str]) -> int:
    path, local = argv[1], argv[2]
    remote_base = argv[3] if len(argv) > 3 else "10.201"
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(60)
    sock.connect(path)
    session = vici.Session(sock)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        command, numbers = words[0], [int(w) for w in words[1:]]
        cpu0 = time.process_time()
        print(f"start {time.time():.6f}", flush=True)
        if command == "load":
            for index in range(numbers[0], numbers[1] + 1):
                secret, conn = messages(index, local, remote_base)
                session.load_shared(secret)
                session.load_conn(conn)
        elif command == "add":
            secret, conn = messages(numbers[0], local, remote_base)
            session.load_shared(secret)
            session.load_conn(conn)
        elif command == "del":
            name = conn_name(remote_ip(numbers[0], remote_base))
            session.unload_conn({"name": name})
            session.unload_shared({"id": name})
        else:
            print(f"error unknown command {command}", flush=True)
            continue
        print(f"done {time.time():.6f} {time.process_time() - cpu0:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
