"""The floor: a plain script that loads the same connections straight into charon over VICI.

Per tunnel it sends what our monitor sends for a Geneve PSK tunnel that is its own peering: one
load-shared (the PSK, owned by both addresses) and one load-conn carrying the tunnel's two
transport-mode children (in: local udp/6081, out: remote udp/6081) with start_action=trap, the
same proposals, DPD and identities, over one VICI session, one call after the other. No OVSDB,
no validation, no planning: what is left is charon's own cost plus the Python vici client's.

Driven over stdin/stdout by bench/run.py, one command per line:
    load FIRST LAST   add K   del K   quit
    respond FIRST LAST PEER     (establishment, B: tunnel i from est_b_ip(i) to PEER, trap only)
    initiate FIRST LAST         (establishment, A: tunnel i from LOCAL to est_b_ip(i), loaded then
                                 initiated at once: load-shared, load-conn, initiate of each of its
                                 two children with timeout -1, tunnel after tunnel)
Each answers `start <wall time>` before its first VICI call and `done <wall time> <cpu s>` after the
last. Standalone: `python bench/floor.py VICI_SOCKET LOCAL_IP [REMOTE_BASE [modern|modp2048]]`, then type commands.
"""

from __future__ import annotations

import socket
import sys
import time

import vici

from common import PROPOSALS, PSK, est_b_ip, remote_ip

IKE_PROPOSAL, ESP_PROPOSAL = PROPOSALS["modern"]  # ours' defaults (backends/strongswan/render.py)
GENEVE_PORT = 6081


def conn_name(remote: str) -> str:
    return f"floor-{remote}"


def child(local_ts: str, remote_ts: str, esp: str = ESP_PROPOSAL) -> dict:
    return {"mode": "transport", "local_ts": [local_ts], "remote_ts": [remote_ts],
            "esp_proposals": [esp], "start_action": "trap", "dpd_action": "trap"}


def messages(index: int, local: str, remote_base: str) -> tuple[dict, dict]:
    remote = remote_ip(index, remote_base)
    return pair_messages(index, local, remote, conn_name(remote))


def pair_messages(index: int, local: str, remote: str, name: str,
                  proposals: tuple[str, str] = (IKE_PROPOSAL, ESP_PROPOSAL)) -> tuple[dict, dict]:
    secret = {"id": name, "type": "IKE", "data": PSK, "owners": [local, remote]}
    conn = {name: {
        "version": "2", "local_addrs": [local], "remote_addrs": [remote], "proposals": [proposals[0]],
        "encap": "no", "dpd_delay": "30s",
        "local": {"auth": "psk", "id": local}, "remote": {"auth": "psk", "id": remote},
        "children": {f"gnv{index}-in": child(f"dynamic[udp/{GENEVE_PORT}]", "dynamic[udp]", proposals[1]),
                     f"gnv{index}-out": child("dynamic[udp]", f"dynamic[udp/{GENEVE_PORT}]", proposals[1])},
    }}
    return secret, conn


def main(argv: list[str]) -> int:
    path, local = argv[1], argv[2]
    remote_base = argv[3] if len(argv) > 3 else "10.201"
    proposals = PROPOSALS[argv[4] if len(argv) > 4 else "modern"]
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(60)
    sock.connect(path)
    session = vici.Session(sock)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        command, numbers = words[0], [int(w) for w in words[1:3]]
        cpu0 = time.process_time()
        print(f"start {time.time():.6f}", flush=True)
        if command == "load":
            for index in range(numbers[0], numbers[1] + 1):
                secret, conn = messages(index, local, remote_base)
                session.load_shared(secret)
                session.load_conn(conn)
        elif command == "respond":
            for index in range(numbers[0], numbers[1] + 1):
                local_b = est_b_ip(index)
                secret, conn = pair_messages(index, local_b, words[3], conn_name(local_b), proposals)
                session.load_shared(secret)
                session.load_conn(conn)
        elif command == "initiate":
            for index in range(numbers[0], numbers[1] + 1):
                remote = est_b_ip(index)
                secret, conn = pair_messages(index, local, remote, conn_name(remote), proposals)
                session.load_shared(secret)
                session.load_conn(conn)
                # timeout -1: charon answers at once and negotiates on its own (what ours asks too).
                # Both children at once: the second waits for the IKE SA inside charon and follows
                # as a CREATE_CHILD_SA, as ours' does once the IKE SA is up.
                for direction in ("in", "out"):
                    session.request("initiate", {"ike": conn_name(remote), "child": f"gnv{index}-{direction}",
                                                 "timeout": "-1"})
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
