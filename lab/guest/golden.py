"""Captures of the IKE daemons' real outputs for tests/unit/golden (`lab/run.sh --golden`).

With lab_golden=1 on the kernel command line, every scenario, once its tunnel is established and
carries ESP (after the ping), saves what the parsers in src/ovs_ipsec/backends/*/parse.py read:

* LibreSwan: `ipsec --version`, `whack --status`, `--showstates` and `--trafficstatus` of both
  hosts (h1 initiates, h2 responds), and the exact exit status, stdout and stderr of the failures
  the backend must recognise: addconn of a connection pluto refuses, initiate of an unknown
  connection, whack with no pluto behind the socket. Each command exactly as the backend's
  Dialect runs it (`ipsec addconn|whack --ctlsocket ...`).
* strongSwan: the VICI replies to `version`, `list-sas`, `list-conns` and `get-shared` of both
  hosts, and every ike-updown / child-updown / *-rekey event h1's charon sent while the tunnel came
  up (a listener started with the daemons, before the tunnel existed). VICI's binary values are
  written as JSON strings; tests/unit turns them back into bytes, the shape python-vici returns.

Files go to /results/golden/<scenario>/ (lab/results/<distro>/golden/<scenario>/ on the host),
named <daemon>_<version>_<what>.<ext>; libreswan_SOURCES.md in tests/unit/golden says which were
copied there. Nothing secret is captured: get-shared lists key ids only, and the lab's PSK and
keys exist only in the VM.
"""

import json
import signal
import sys
import time
from pathlib import Path

RESULTS = Path("/results/golden")
EVENT_TYPES = ["ike-updown", "child-updown", "ike-rekey", "child-rekey"]
SIDES = {"h1": "initiator", "h2": "responder"}


def folder(scenario: str) -> Path:
    path = RESULTS / scenario
    path.mkdir(parents=True, exist_ok=True)
    return path


def _captured(cp) -> str:
    """The format of tests/unit/golden's captured failures (test_libreswan_parse.captured)."""
    return f"rc={cp.returncode}\n--- stdout\n{cp.stdout}--- stderr\n{cp.stderr}"


# --- LibreSwan -------------------------------------------------------------------------------

BAD_CONN = """\
conn bad-1
    type=transport
    left={left}
    right=192.0.2.99
    authby=secret
    leftprotoport=notaproto/70000
"""


def libreswan(scenario: str, backend, hosts: list) -> None:
    out = folder(scenario)
    h1 = hosts[0]
    cp = h1.sh.run(["ipsec", "--version"], check=False)
    version = cp.stdout.split()[1] if cp.stdout.startswith("Libreswan ") else "unknown"
    prefix = f"libreswan_{version}"
    (out / f"{prefix}_version.txt").write_text(cp.stdout)
    for host in hosts:
        ctl = backend.ctl(host)
        for what, flag in (("status", "--status"), ("showstates", "--showstates"),
                           ("trafficstatus", "--trafficstatus")):
            cp = host.sh.run(["ipsec", "whack", "--ctlsocket", ctl, flag], netns=host.name, check=False)
            (out / f"{prefix}_{what}_{SIDES[host.name]}.txt").write_text(cp.stdout + cp.stderr)
    ctl, root = backend.ctl(h1), backend.root(h1)
    bad = root / "etc/bad.conf"
    bad.write_text(BAD_CONN.format(left=h1.ip))
    failures = {
        "addconn_bad": ["ipsec", "addconn", "--ctlsocket", ctl, "--config", bad, "bad-1"],
        "initiate_unknown": ["ipsec", "whack", "--ctlsocket", ctl, "--name", "nosuch", "--initiate",
                             "--asynchronous"],
        "not_running": ["ipsec", "whack", "--ctlsocket", root / "run/nonexistent.ctl", "--status"],
    }
    for what, argv in failures.items():
        cp = h1.sh.run(argv, netns=h1.name, check=False)
        (out / f"{prefix}_{what}.txt").write_text(_captured(cp))
    accepts_rendered_files(h1, backend, version, out / f"{prefix}_golden_conf_addconn.json")


# The renderer's golden files (tests/unit/golden/libreswan*.conf, copied into the overlay by
# labhost/image.py): every option the monitor can write, as rendered for pluto 4 (libreswan4_*)
# and pluto 5 (libreswan5_*), plus LibreSwan's own cases (libreswan_*). The certificate ones name
# NSS certificates this pluto does not have.
GOLDEN_CONFS = Path(__file__).resolve().parent.parent / "golden-conf"
NEEDS_NSS = ("ca_cert", "peer_cert")


def accepts_rendered_files(host, backend, version: str, report: Path) -> None:
    """addconn every rendered golden file into this pluto, as the backend does; delete them again.
    Raises when one written for this major version is refused (the scenario then fails)."""
    major = version.split(".")[0]
    outcome, refused = {}, []
    for conf in sorted(GOLDEN_CONFS.glob("libreswan*.conf")):
        case = conf.stem
        if case.endswith(NEEDS_NSS):
            continue
        names = [line.split()[1] for line in conf.read_text().splitlines() if line.startswith("conn ")]
        cp = host.sh.run(["ipsec", "addconn", "--ctlsocket", backend.ctl(host), "--config", conf, *names],
                         netns=host.name, check=False)
        outcome[case] = {"rc": cp.returncode, "stdout": cp.stdout, "stderr": cp.stderr}
        for name in names:
            host.sh.run(["ipsec", "whack", "--ctlsocket", backend.ctl(host), "--name", name, "--delete"],
                        netns=host.name, check=False)
        other_major = case.startswith(("libreswan4_", "libreswan5_")) and not case.startswith(f"libreswan{major}_")
        if (cp.returncode or cp.stderr.strip()) and not other_major:
            refused.append(case)
    report.write_text(json.dumps(outcome, indent=2) + "\n")
    if refused:
        raise RuntimeError(f"pluto {version} refused the rendered {', '.join(refused)} (see {report})")


# --- strongSwan ------------------------------------------------------------------------------

def _plain(value):
    """VICI reply -> JSON: bytes become str (tests turn them back), sections stay objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _session(socket_path: str):
    import socket

    import vici

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(socket_path)
    return vici.Session(sock)


def vici_dump(socket_path: str, side: str, out: Path) -> None:
    session = _session(socket_path)
    version = session.version()
    prefix = f"strongswan_{version['version'].decode()}"
    replies = {"version": version, "list_sas": list(session.list_sas()),
               "list_conns": list(session.list_conns()), "get_shared": session.get_shared()}
    for what, reply in replies.items():
        (out / f"{prefix}_{what}_{side}.json").write_text(json.dumps(_plain(reply), indent=2) + "\n")


def vici_events(socket_path: str, out: Path, seconds: float) -> None:
    """Listen until SIGTERM or `seconds`; one JSON line per event, flushed as it arrives."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    session = _session(socket_path)
    prefix = f"strongswan_{session.version()['version'].decode()}"
    deadline = time.monotonic() + seconds
    with open(out / f"{prefix}_events.jsonl", "w") as f:
        for label, message in session.listen(EVENT_TYPES, timeout=1):
            if label is not None:
                f.write(json.dumps({"event": _plain(label), "message": _plain(message)}) + "\n")
                f.flush()
            if time.monotonic() > deadline:
                break


class StrongSwanEvents:
    """The event listener on h1's charon, started before the tunnel exists."""

    def __init__(self, scenario: str, backend, host):
        self.out, self.backend, self.host, self.proc = folder(scenario), backend, host, None

    def start(self) -> None:
        from monitor import PYTHON_ENV
        self.proc = self.host.sh.spawn(
            ["python3", Path(__file__).resolve(), "vici-events", self.backend.vici(self.host), self.out, "120"],
            env=PYTHON_ENV, log=self.out / "events.out")

    def stop(self) -> None:
        from proc import stop_pid
        if self.proc:
            stop_pid(self.proc.pid)
            self.proc.wait(timeout=5)


def strongswan(scenario: str, backend, hosts: list) -> None:
    from monitor import PYTHON_ENV
    out = folder(scenario)
    for host in hosts:
        host.sh.run(["python3", Path(__file__).resolve(), "vici-dump", backend.vici(host), SIDES[host.name], out],
                    env=PYTHON_ENV)


def capture(scenario: str, backend, hosts: list) -> None:
    {"libreswan": libreswan, "strongswan": strongswan}[backend.name](scenario, backend, hosts)


if __name__ == "__main__":
    # python3 golden.py vici-dump SOCKET SIDE OUT | vici-events SOCKET OUT SECONDS
    if sys.argv[1] == "vici-dump":
        vici_dump(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "vici-events":
        vici_events(sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]))
