"""`ovs-ipsec` (monitor | status | pki) and `ovs-monitor-ipsec` (upstream's command line).

Wiring happens here, once: the objects are built from the arguments and handed to each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping

from .. import __version__
from ..errors import OvsIpsecError

MONITOR_PROGRAM = "ovs-monitor-ipsec"
DEFAULT_DATABASE = "unix:/var/run/openvswitch/db.sock"
# Where Debian, Ubuntu, RHEL and Fedora's Open vSwitch keep sockets, pidfiles and logs. The `ovs`
# Python package has its own idea (PyPI's python-ovs: /usr/local/var/...), which need not match
# the Open vSwitch actually installed; see ovs_dirs().
SYSTEM_RUNDIR = "/var/run/openvswitch"
SYSTEM_LOGDIR = "/var/log/openvswitch"
DEFAULT_PIDFILE = object()  # a bare --pidfile: <rundir>/ovs-monitor-ipsec.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovs-ipsec", description="Encrypt Open vSwitch tunnels with IPsec.")
    parser.add_argument("--version", action="version", version=f"ovs-ipsec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_monitor_arguments(commands.add_parser("monitor", help="run the IPsec monitor daemon"))
    status = commands.add_parser("status", help="show every tunnel's IPsec state")
    status.add_argument("--unixctl", help="the monitor's control socket (default: found through its pidfile)")
    status.add_argument("--json", action="store_true", help="print the stable JSON form")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                        help="refresh the table every SECONDS (default 2)")
    status.set_defaults(func=run_status)
    from ..pki import cli as pki_cli

    pki_cli.add_parser(commands)
    # A packaged host's helpers (packaging/, debian/): the guard before ovs-vswitchd at boot, and the
    # switch from Debian's openvswitch-ipsec.
    from . import boot_guard, migrate

    boot_guard.add_parser(commands)
    migrate.add_parser(commands)
    from ..userspace import cli as userspace_cli  # userspace-esp, pcap-decrypt

    userspace_cli.add_parsers(commands)
    args = parser.parse_args(argv)
    return args.func(args)


def monitor_main(argv: list[str] | None = None) -> int:
    """Upstream's `ovs-monitor-ipsec [options] DATABASE`."""
    parser = argparse.ArgumentParser(prog=MONITOR_PROGRAM, description="Encrypt Open vSwitch tunnels with IPsec.")
    add_monitor_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


def add_monitor_arguments(parser: argparse.ArgumentParser) -> None:
    import ovs.daemon
    import ovs.util
    import ovs.vlog

    # The pidfile, control socket and log file names derive from the program name; use
    # upstream's, so `ovs-appctl -t ovs-monitor-ipsec` and ovs-ctl find us.
    ovs.util.PROGRAM_NAME = MONITOR_PROGRAM
    parser.add_argument("database", metavar="DATABASE", nargs="?", default=DEFAULT_DATABASE,
                        help=f"OVSDB remote (default {DEFAULT_DATABASE})")
    parser.add_argument("--ike-daemon", choices=("strongswan", "libreswan"), default="strongswan")
    parser.add_argument("--vici-uri", help="charon's VICI socket (default unix://<root-prefix>/var/run/charon.vici)")
    parser.add_argument("--unixctl", help="control socket path (default <rundir>/ovs-monitor-ipsec.<pid>.ctl)")
    parser.add_argument("--root-prefix", default="", help="prefix for the IKE daemon's paths (for testing)")
    parser.add_argument("--no-restart-ike-daemon", action="store_true",
                        help="accepted for compatibility: the IKE daemon is never restarted")
    parser.add_argument("--command-timeout", type=int, default=120,
                        help="seconds before a call to the IKE daemon is abandoned (capped at 30 for VICI)")
    parser.add_argument("--resync-interval", type=float, default=60.0,
                        help="seconds between full comparisons with the IKE daemon (default 60)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (default: off)")
    parser.add_argument("--events-file", metavar="PATH",
                        help="also append each event (tunnel up/down/invalid/error, ...) as a JSON line to PATH")
    for option in ("--ipsec-conf", "--root-ipsec-conf", "--ipsec-d", "--ipsec-secrets", "--ipsec-ctl"):
        parser.add_argument(option, help="LibreSwan only")
    parser.add_argument("--use-default-crypto", action="store_true", help="LibreSwan only")
    ovs.vlog.add_args(parser)
    ovs.daemon.add_args(parser)
    # ovs.daemon computes the bare --pidfile's name now, from the `ovs` package's run directory;
    # run_monitor() names it once it knows the run directory of the Open vSwitch we serve.
    for action in parser._actions:
        if action.dest == "pidfile":
            action.const = DEFAULT_PIDFILE
            action.help = "create a pidfile (default: <rundir>/ovs-monitor-ipsec.pid)"
    parser.set_defaults(func=run_monitor)


def ovs_dirs(database: str, environ: Mapping[str, str], package_rundir: str, package_logdir: str,
             isdir=os.path.isdir) -> tuple[str, str]:
    """(rundir, logdir) of the Open vSwitch we serve, whatever `ovs` Python package is imported.

    The run directory is where that Open vSwitch's tools look for our pidfile and control socket
    (`ovs-appctl -t ovs-monitor-ipsec`): $OVS_RUNDIR as for every OVS tool, else the folder of the
    database socket we were given (ovs-ctl and the units put db.sock in the run directory), else
    the `ovs` package's own directory if it exists, else the system one. Logs likewise:
    $OVS_LOGDIR, else the package's directory if it exists, else /var/log/openvswitch.
    """
    rundir = environ.get("OVS_RUNDIR")
    if not rundir and database.startswith("unix:") and isdir(os.path.dirname(database[len("unix:"):])):
        rundir = os.path.dirname(database[len("unix:"):])
    if not rundir:
        rundir = package_rundir if isdir(package_rundir) else SYSTEM_RUNDIR
    logdir = environ.get("OVS_LOGDIR") or (package_logdir if isdir(package_logdir) else SYSTEM_LOGDIR)
    return rundir, logdir


def one_malloc_arena() -> None:
    """Have glibc serve every thread from one malloc arena, as MALLOC_ARENA_MAX=1 would.

    By default each thread that allocates gets an arena of its own; the worker thread's held
    7 MB of the monitor's 74 MB peak at 5000 tunnels, in pages freed by one thread and reused by
    none. The GIL already serialises the threads' allocations, so one arena costs no parallelism.
    """
    import ctypes

    m_arena_max = -8  # from glibc's malloc.h
    try:
        ctypes.CDLL(None).mallopt(m_arena_max, 1)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def run_monitor(args: argparse.Namespace) -> int:
    import ovs.daemon
    import ovs.dirs
    import ovs.util
    import ovs.vlog

    from ..backends.base import Backend
    from ..backends.strongswan.backend import StrongSwanBackend
    from ..daemon.loop import Monitor, Wakeup
    from ..daemon.reconciler import Reconciler
    from ..daemon.worker import Worker
    from ..daemon.workqueue import WorkQueue
    from ..guard.enforcer import PlaintextGuard
    from ..guard.xfrm import XfrmPolicyInstaller
    from ..ovsdb.reader import OvsdbReader
    from ..pki.inspect import CertificateInspector
    from ..status.events import EventLog
    from ..status.metrics import MetricsServer, parse_address
    from . import logbridge

    # Before any default path is derived (--pidfile, --log-file, the control socket): ovs.daemon,
    # ovs.vlog and ovs.unixctl read these two attributes when they build a default name.
    ovs.dirs.RUNDIR, ovs.dirs.LOGDIR = ovs_dirs(args.database, os.environ, ovs.dirs.RUNDIR, ovs.dirs.LOGDIR)
    if args.pidfile is DEFAULT_PIDFILE:
        args.pidfile = ovs.daemon.make_pidfile_name(None)
    # Upstream's vlog module name, so `-vovs-monitor-ipsec:dbg` and `vlog/set ovs-monitor-ipsec:dbg`
    # work as they do with upstream. Modules must exist before vlog is initialised.
    follow_vlog_levels = logbridge.install(MONITOR_PROGRAM)
    ovs.vlog.handle_args(args)
    follow_vlog_levels()
    ovs.daemon.handle_args(args)
    vici_uri = args.vici_uri or f"unix://{args.root_prefix}/var/run/charon.vici"
    try:
        reader = OvsdbReader(args.database)
        # Bound before detaching, so a bad or busy address is reported here; served after the fork.
        metrics = MetricsServer(parse_address(args.metrics_address)) if args.metrics_address else None
        events = EventLog(logging.getLogger("ovs_ipsec.events"),  # absolute: daemonize may chdir to /
                          os.path.abspath(args.events_file) if args.events_file else None)
        # Fork before any thread starts (threads do not survive fork()), but tell the parent we are
        # up only once the control socket exists: until daemonize_complete() the parent waits and
        # exits with our status, so with --detach a fatal error still fails the start (systemd's
        # Type=forking sees it) instead of exiting 0 and leaving a silent restart loop.
        ovs.daemon.daemonize_start()
        one_malloc_arena()  # before the first thread
        backend: Backend
        if args.ike_daemon == "libreswan":
            from ..backends.libreswan.backend import LibreSwanBackend

            # Where the control socket will be (as ovs.unixctl names it): our pluto updown
            # command sends its event hints there.
            unixctl = (ovs.util.abs_file_name(ovs.dirs.RUNDIR, args.unixctl) if args.unixctl
                       else os.path.join(ovs.dirs.RUNDIR, f"{ovs.util.PROGRAM_NAME}.{os.getpid()}.ctl"))
            backend = LibreSwanBackend.from_args(args, unixctl=unixctl)
        else:
            backend = StrongSwanBackend(vici_uri, timeout=min(float(args.command_timeout), 30.0))
        wakeup = Wakeup()
        queue = WorkQueue(args.resync_interval)
        guard = PlaintextGuard(XfrmPolicyInstaller(timeout=float(min(args.command_timeout, 30))))
        reconciler = Reconciler(backend, CertificateInspector(), queue, events=events, guard=guard,
                                on_publish=wakeup.notify)
        worker = Worker(reconciler, queue, backend, clock=time.time)
        monitor = Monitor(reader, worker, args.unixctl, wakeup=wakeup, metrics_server=metrics)
        ovs.daemon.daemonize_complete()
        monitor.run()
    except OvsIpsecError as exc:
        # Both places an operator looks: the log file (vlog) and stderr, which is the journal
        # under systemd (still open: daemonize_complete() has not closed it yet).
        logging.getLogger("ovs_ipsec.monitor").critical("cannot start: %s", exc)
        print(f"{MONITOR_PROGRAM}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception:
        logging.getLogger("ovs_ipsec.monitor").critical("stopped by an unexpected error", exc_info=True)
        raise
    return 0


def run_status(args: argparse.Namespace) -> int:
    from ..status.render import render_table

    try:
        while True:
            status = query_status(args.unixctl or default_unixctl_path())
            if args.json:
                print(json.dumps(status, indent=2, sort_keys=True))
            else:
                if args.watch:
                    print("\033[H\033[J", end="")
                print(render_table(status, time.time()), end="")
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except OvsIpsecError as exc:
        print(f"ovs-ipsec status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def default_unixctl_path(environ: Mapping[str, str] = os.environ) -> str:
    """The running monitor's control socket, found through its pidfile as ovs-appctl finds it.

    Looked for in $OVS_RUNDIR, the system run directory and the `ovs` package's own (which for
    PyPI's python-ovs is /usr/local/var/run/openvswitch, not where a packaged monitor runs).
    """
    import ovs.dirs

    tried = []
    for rundir in dict.fromkeys(filter(None, (environ.get("OVS_RUNDIR"), SYSTEM_RUNDIR, ovs.dirs.RUNDIR))):
        pidfile = os.path.join(rundir, f"{MONITOR_PROGRAM}.pid")
        try:
            with open(pidfile) as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError) as exc:
            tried.append(f"{pidfile}: {exc.strerror if isinstance(exc, OSError) else exc}")
            continue
        return os.path.join(rundir, f"{MONITOR_PROGRAM}.{pid}.ctl")
    raise OvsIpsecError(f"cannot find the monitor ({'; '.join(tried)}); is it running? (or use --unixctl)")


def query_status(path: str, timeout: int = 10) -> dict:
    import ovs.unixctl.client

    def give_up(_signum, _frame):
        raise OvsIpsecError(f"no answer from {path} within {timeout} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(timeout)
    try:
        error, client = ovs.unixctl.client.UnixctlClient.create(path)
        if error:
            raise OvsIpsecError(f"cannot connect to {path}: {os.strerror(error)}")
        try:
            error, reply_error, reply = client.transact("tunnels/show", ["--json"])
        finally:
            client.close()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if error or reply_error:
        raise OvsIpsecError(f"{path}: {reply_error or os.strerror(error)}")
    return json.loads(reply)


if __name__ == "__main__":
    sys.exit(main())
