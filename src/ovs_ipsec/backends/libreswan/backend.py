"""The LibreSwan adapter: pluto through its own command line (`ipsec addconn`, `ipsec whack`).

Every command goes through ovs_ipsec.runner.run with a timeout; a failure is a BackendError for
the one connection it concerns. Files are written atomically and only when they change.

Connections are added in batches: LoadConn writes the peering's file and queues it; the queue goes
to pluto in one `ipsec addconn` per BATCH_LIMIT peerings (one process and one parse instead of
one per peering) before the next action that needs it, or at flush(). After a batch, pluto's list
says which connections it took; a peering it did not take is added again alone, so a bad
connection fails alone, with pluto's own reason, and the others load.

Events: see events.py (pluto's updown command and an inotify watch; no polling).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

from ...errors import BackendError, CommandError
from ...model import AuthMethod, ObservedState, Tunnel
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
from ...runner import Runner, run
from . import events, nss, parse, render
from .files import ConnFiles, Paths

log = logging.getLogger(__name__)

# Peerings per `ipsec addconn`: one process and one parse per batch instead of one per peering,
# and a batch small enough that pluto answers other requests between two of them.
BATCH_LIMIT = 250


@dataclass(frozen=True)
class _Pending:
    """A LoadConn whose pluto part is queued: its file is written already."""

    peering: Peering
    to_add: tuple[str, ...]  # pluto connections to add, in order (the anchor last)
    to_delete: tuple[str, ...]  # children pluto has that the peering no longer wants
    to_route: tuple[str, ...]


@dataclass(frozen=True)
class Dialect:
    """What differs between LibreSwan majors, as far as this backend is concerned.

    4.x and 5.x both keep `ipsec addconn` (several connections per call, which `ipsec auto
    --add` / 5.x `ipsec add` wrap one at a time) and `ipsec whack` (--initiate --asynchronous,
    --delete, --route, --rereadsecrets, --status). 5.x dropped `ipsec auto`, the numeric line
    codes, the STATE_V2_ names and `hostaddrfamily=`; the renderer and parser take care of those.
    """

    major: int
    minor: int

    def addconn(self, paths: Paths, config: str, names: Collection[str]) -> list[str]:
        return [paths.ipsec, "addconn", "--ctlsocket", paths.ctl, "--config", config, *names]

    def whack(self, paths: Paths, *args: str) -> list[str]:
        return [paths.ipsec, "whack", "--ctlsocket", paths.ctl, *args]


class LibreSwanBackend:
    name = "libreswan"
    # Removals first: what pluto does with two routed connections for one policy, and with that
    # policy once the old one goes, is not proven here.
    make_before_break = False

    def __init__(self, paths: Paths, timeout: float = 30.0, default_crypto: bool = False,
                 dialect: Dialect | None = None, unixctl: str | None = None, run: Runner = run) -> None:
        """`unixctl`: the monitor's control socket, where our updown command sends its hints
        (None: no updown command of ours; SA changes are then seen at the periodic full look)."""
        self.paths = paths
        self._run = run
        self._timeout = timeout
        self._dialect = dialect
        self._updown: tuple[str, str] | None = None  # (script path, its text)
        if unixctl is not None:
            script = os.path.join(paths.conn_dir, events.UPDOWN_NAME)
            appctl = shutil.which("ovs-appctl") or "/usr/bin/ovs-appctl"
            self._updown = (script, events.updown_script(paths.ipsec, appctl, os.path.abspath(unixctl)))
        self._style = render.Style(major=dialect.major if dialect else 4, default_crypto=default_crypto,
                                   updown=self._updown[0] if self._updown else None)
        # Through self._style, so the names follow the detected version whenever it is detected.
        self.naming = Naming(conn_name=lambda t: render.conn_name(t, self._style),
                             secret_id=lambda t: render.secret_id(t, self._style),
                             child_names=lambda t: render.child_names(t, self._style),
                             child_owner=render.child_owner)
        self._nss = nss.NssDatabase(paths.nss_dir, timeout, run)
        self._files = ConnFiles(paths)
        self._lock = threading.Lock()  # guards the caches below against the event threads
        self._loaded: dict[str, set[str]] | None = None  # peering -> pluto connections, as seen or made
        self._owners: set[str] = set()  # pluto connections that own an IKE SA, as last seen
        self._ike: dict[str, bool] = {}  # peering -> has an IKE SA (True: established)
        # pluto has read our secret files as they are now. Reading them again costs pluto all N
        # files, so a batch only marks them stale and flush() (or an initiation) rereads once.
        self._secrets_fresh = False
        self._nss_dirty = True
        self._main_files_checked = False
        self._pending: list[_Pending] = []  # LoadConns queued for the next batch
        self._load_errors: dict[str, BackendError] = {}  # peering -> why its queued load failed
        self._watches: list[events.DirectoryWatch] = []
        self._log_followed: str | None = None  # pluto's log file, when followed

    @classmethod
    def from_args(cls, args, unixctl: str | None = None) -> LibreSwanBackend:
        """Build from the monitor's (upstream-compatible) command-line flags and its control socket."""
        paths = Paths.from_flags(args.root_prefix, args.ipsec_conf, args.root_ipsec_conf, args.ipsec_secrets,
                                 args.ipsec_d, args.ipsec_ctl)
        backend = cls(paths, timeout=float(args.command_timeout), default_crypto=args.use_default_crypto,
                      unixctl=unixctl)
        backend.dialect()  # fail early, with the reason, if `ipsec` is missing or not LibreSwan
        return backend

    # -- commands ----------------------------------------------------------------------------------

    def dialect(self) -> Dialect:
        if self._dialect is None:
            try:
                out = self._run([self.paths.ipsec, "--version"], timeout=self._timeout)
            except CommandError as exc:
                raise BackendError(f"cannot tell the LibreSwan version: {exc}", transport=True) from exc
            found = parse.version(out.stdout + out.stderr)
            if found is None:
                raise BackendError(f"{self.paths.ipsec} --version does not name a LibreSwan version: "
                                   f"{out.stdout.strip()[:200]!r}", transport=True)
            if found[0] < 4:
                log.warning("LibreSwan %d.%d is older than 4.0 and untested; using the 4.x syntax", *found)
            self._dialect = Dialect(*found)
            self._style = replace(self._style, major=found[0], minor=found[1])
            log.info("driving LibreSwan %d.%d through %s (control socket %s)", *found, self.paths.ipsec,
                     self.paths.ctl)
        return self._dialect

    def _command(self, what: str, argv: list[str], query: bool = False) -> str:
        """Run one command; a query (status) that fails means pluto is unreachable for everyone."""
        try:
            result = self._run(argv, timeout=self._timeout, check=False)
        except CommandError as exc:
            raise BackendError(f"pluto: {what}: {exc}", transport=query) from exc
        if parse.unreachable(result.stdout, result.stderr):
            raise BackendError(f"pluto is not answering on {self.paths.ctl} ({what})", transport=True)
        if query:
            if result.returncode != 0:
                raise BackendError(f"pluto: {what} exited with status {result.returncode}: "
                                   f"{result.stderr.strip()[:300]}", transport=True)
            return result.stdout
        problem = parse.problem(result.stdout, result.stderr, result.returncode)
        if problem:
            raise BackendError(f"pluto refused {what}: {problem}")
        return result.stdout

    def _status(self) -> tuple[set[str], list[parse.PlutoState]]:
        """`whack --status`, through a file read line by line: at N = 1000 it is ~8 MB, which held
        as bytes and then as text made the monitor's peak RSS (the allocator keeps the high-water
        mark)."""
        argv = self.dialect().whack(self.paths, "--status")
        with tempfile.TemporaryFile("w+") as out:
            try:
                result = self._run(argv, timeout=self._timeout, check=False, stdout_file=out)
            except CommandError as exc:
                raise BackendError(f"pluto: status: {exc}", transport=True) from exc
            if parse.unreachable(result.stdout, result.stderr) or result.returncode != 0:
                raise BackendError(f"pluto is not answering on {self.paths.ctl} (status: exit status "
                                   f"{result.returncode}, {result.stderr.strip()[:300]})", transport=True)
            out.seek(0)
            return parse.status_lines(out)

    def _whack(self, what: str, *args: str, query: bool = False) -> str:
        return self._command(what, self.dialect().whack(self.paths, *args), query)

    # -- observe -----------------------------------------------------------------------------------

    def observe(self, conn_names: Collection[str] | None = None) -> ObservedState:
        """Full: `whack --status` (every connection and state). Scoped: `whack --showstates`
        only, with the connections this daemon loaded since the last full look (pluto's list
        changes behind our back only on a restart, which triggers a full look, or by hand,
        which the periodic full look repairs)."""
        self._ensure_main_files()
        with self._lock:
            cached = None if conn_names is None or self._loaded is None else set().union(*self._loaded.values())
        if cached is None:
            loaded, found = self._status()
        else:
            loaded, found = cached, parse.states(self._whack("showstates", "--showstates", query=True))
        conf_stems, secret_stems = self._files.stems()
        observed = parse.observed_from(loaded, found, conf_stems, secret_stems)
        with self._lock:
            self._owners = parse.ike_owners(found)
            self._loaded = {}
            for name in loaded:
                parts = render.split_name(name)
                if parts:
                    self._loaded.setdefault(parts[0], set()).add(name)
            self._ike = {peering: any(sa.established for sa in sas) for peering, sas in observed.sas.items()}
        if conn_names is None:
            return replace(observed, daemon_id=self._daemon_id())
        scope = set(conn_names)
        return ObservedState(conns={k: v for k, v in observed.conns.items() if k in scope},
                             shared_secrets=observed.shared_secrets,
                             sas={k: v for k, v in observed.sas.items() if k in scope})

    # -- apply -------------------------------------------------------------------------------------

    def apply(self, action: Action) -> None:
        self.dialect()
        self._ensure_main_files()
        if not isinstance(action, (LoadConn, LoadSecret)):
            self._load_pending()  # what follows may need the connections queued so far
            if isinstance(action, (Initiate, TerminateChild)) and action.conn_name in self._load_errors:
                return  # its load failed: flush() reports that, for this connection alone
        if isinstance(action, LoadSecret):
            try:
                text = render.secrets_file(action.peering)
            except ValueError as exc:
                raise BackendError(f"cannot describe {action.peering.conn_name} to pluto: {exc}") from exc
            assert action.peering.secret_id is not None  # only PSK peerings have a secret to load
            if self._files.write(action.peering.secret_id, ".secrets", text, secret=True):
                self._secrets_fresh = False
        elif isinstance(action, UnloadSecret):
            if self._files.remove(action.secret_id, ".secrets"):
                self._secrets_fresh = False
        elif isinstance(action, LoadConn):
            self._queue_load(action.peering)
        elif isinstance(action, UnloadConn):
            self._unload(action.conn_name)
        elif isinstance(action, TerminateChild):
            with self._lock:
                loaded = action.child in (self._loaded or {}).get(action.conn_name, ())
            if loaded:
                try:
                    self._whack(f"terminate {action.child}", "--name", action.child, "--terminate")
                except BackendError as exc:
                    if exc.transport:
                        raise
        elif isinstance(action, Initiate):
            self._initiate(action.conn_name, action.child)
        else:
            raise TypeError(f"unknown action {action!r}")

    def _queue_load(self, peering: Peering) -> None:
        first = peering.tunnels[0]
        if first.auth is not AuthMethod.PSK:
            self._install_certificates(peering)
        try:
            text = render.conn_file(peering, self._style)
        except ValueError as exc:
            raise BackendError(f"cannot describe {peering.conn_name} to pluto: {exc}") from exc
        self._files.write(peering.conn_name, ".conf", text, secret=False)
        self._load_errors.pop(peering.conn_name, None)
        wanted = render.pluto_names(peering)
        anchor = wanted[-1]
        with self._lock:
            loaded = set((self._loaded or {}).get(peering.conn_name, ()))
            anchor_owns = anchor in self._owners
        to_add = [name for name in wanted if name not in loaded]
        if to_add and anchor in loaded and not anchor_owns:
            # Re-adding the anchor (it holds no IKE SA) puts it first in line for the next one.
            to_add = [name for name in to_add if name != anchor] + [anchor]
        # No initiator rule both ends can agree on: on demand, from traffic, as upstream.
        to_route = [name for name in to_add if name != anchor] \
            if first.auth is AuthMethod.PSK and not first.local_ip else []
        self._pending.append(_Pending(peering, tuple(to_add), tuple(sorted(loaded - set(wanted))), tuple(to_route)))
        if len(self._pending) >= BATCH_LIMIT:
            self._load_pending()

    def _load_pending(self) -> None:
        """Send the queued loads to pluto; a refused one lands in self._load_errors, for its peering."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            adding = [item for item in pending if item.to_add]
            if len(adding) == 1:
                self._add_alone(adding[0])
            elif adding:
                for start in range(0, len(adding), BATCH_LIMIT):
                    self._add_batch(adding[start:start + BATCH_LIMIT])
                self._add_missing(adding)
            for item in pending:
                name = item.peering.conn_name
                if name in self._load_errors:
                    continue
                try:
                    for child in item.to_delete:
                        self._whack(f"delete {child}", "--name", child, "--delete")
                    for child in item.to_route:
                        self._whack(f"route {child}", "--name", child, "--route")
                except BackendError as exc:
                    if exc.transport:
                        raise
                    self._load_errors[name] = exc
                    continue
                with self._lock:
                    if self._loaded is not None:
                        self._loaded[name] = set(render.pluto_names(item.peering))
        except BackendError as exc:
            if exc.transport:
                # pluto is gone: the reconciler looks at everything again once it answers.
                with self._lock:
                    self._loaded = None
            raise

    def _add_batch(self, batch: list[_Pending]) -> None:
        # One file with every peering's sections (each file's text as written, so pluto reads the
        # same), beside them: addconn takes one --config. Not *.conf: no include matches it.
        texts = [self._files.read(item.peering.conn_name, ".conf") for item in batch]
        names = [name for item in batch for name in item.to_add]
        with tempfile.NamedTemporaryFile("w", dir=self.paths.conn_dir, prefix=".ovsipsec-batch-",
                                         suffix=".tmp") as handle:
            handle.write("\n".join(texts))
            handle.flush()
            argv = self.dialect().addconn(self.paths, handle.name, names)
            try:
                result = self._run(argv, timeout=self._timeout * (1 + len(batch) // 50), check=False)
            except CommandError as exc:
                raise BackendError(f"pluto: add {len(batch)} connections: {exc}", transport=True) from exc
        if parse.unreachable(result.stdout, result.stderr):
            raise BackendError(f"pluto is not answering on {self.paths.ctl} (add)", transport=True)

    def _add_missing(self, added: list[_Pending]) -> None:
        """addconn's exit status and output are those of the last connection only: 4.10 refuses a
        proposal it does not know with exit status 36 and not a word, and in a batch exits 0
        unless that connection was the last one. So pluto's own list says what it took (one
        listing for all the batches); what it did not take is added alone, for pluto's reason."""
        loaded = self._status()[0]
        missing = [item for item in added if not loaded.issuperset(item.to_add)]
        if missing:
            log.debug("%d of %d peerings not loaded by their batch: added one by one", len(missing), len(added))
        for item in missing:
            self._add_alone(item)

    def _add_alone(self, item: _Pending) -> None:
        """One addconn for the peering's own file: pluto parses only that one."""
        name = item.peering.conn_name
        try:
            self._command(f"add {name}", self.dialect().addconn(self.paths, self._files.path(name, ".conf"),
                                                                 item.to_add))
        except BackendError as exc:
            if exc.transport:
                raise
            self._load_errors[name] = exc

    def _unload(self, peering_name: str) -> None:
        """Delete the peering's pluto connections, by the names pluto lists for it.

        Names come from pluto's own list (matched in full against our naming scheme), never from
        a file: a file can be edited behind our back, and what it says must not decide what gets
        deleted."""
        with self._lock:
            known = self._loaded
        if known is None:
            self.observe(None)
            with self._lock:
                known = self._loaded or {}
        names = set(known.get(peering_name, ()))
        # Children first, the anchor (which holds the IKE SA) last.
        for name in sorted(names, key=lambda n: n == render.anchor_name(peering_name)):
            self._whack(f"delete {name}", "--name", name, "--delete")
        self._files.remove(peering_name, ".conf")
        with self._lock:
            (self._loaded or {}).pop(peering_name, None)
            self._ike.pop(peering_name, None)
        self._nss_dirty = True

    def flush(self) -> Mapping[str, BackendError]:
        """The queued loads and the secrets reread; returns the peerings whose load pluto refused."""
        self._load_pending()
        if not self._secrets_fresh:
            self._reread_secrets()
        failed, self._load_errors = self._load_errors, {}
        return failed

    def _initiate(self, peering_name: str, child: str) -> None:
        if not self._secrets_fresh:
            self._reread_secrets()  # IKE_AUTH needs the PSK
        with self._lock:
            has_ike = peering_name in self._ike
            anchor_loaded = render.anchor_name(peering_name) in (self._loaded or {}).get(peering_name, ())
        if not has_ike and anchor_loaded:
            # The IKE SA belongs to the anchor, so tunnels can come and go without it; the child
            # waits on it inside pluto ("queue Child SA; waiting on IKE SA").
            anchor = render.anchor_name(peering_name)
            self._whack(f"initiate {anchor}", "--name", anchor, "--initiate", "--asynchronous")
            with self._lock:
                self._ike[peering_name] = False
        self._whack(f"initiate {child}", "--name", child, "--initiate", "--asynchronous")

    def _reread_secrets(self) -> None:
        self._whack("rereadsecrets", "--rereadsecrets")
        self._secrets_fresh = True

    def _install_certificates(self, peering: Peering) -> None:
        first = peering.tunnels[0]
        local, peer, ca = render.nss_names(first)
        assert local is not None  # a certificate tunnel always has its own certificate
        changed = self._nss.ensure(local, first.local_cert_pem or b"", "u,u,u", key_pem=first.local_key_pem or b"")
        if peer:
            changed |= self._nss.ensure(peer, first.remote_cert_pem or b"", nss.TRUST_PEER)
        if ca:
            changed |= self._nss.ensure(ca, first.ca_cert_pem or b"", nss.TRUST_CA)
        self._nss_dirty |= changed

    def not_applicable(self, tunnel: Tunnel) -> tuple[tuple[str, str], ...]:
        return render.not_applicable(tunnel.options, self._style)

    def cleanup_credentials(self, peerings: Collection[Peering]) -> None:
        """Delete our NSS entries that none of the peerings in force uses any more."""
        if not self._nss_dirty or not os.path.isdir(self.paths.nss_dir):
            return
        wanted = {nickname for peering in peerings for nickname in render.nss_names(peering.tunnels[0]) if nickname}
        try:
            for nickname in sorted(self._nss.nicknames() - wanted):
                self._nss.delete(nickname, with_key=nickname.startswith("ovsipsec-key-"))
                log.info("NSS database %s: removed %s (no longer used)", self.paths.nss_dir, nickname)
        except BackendError as exc:  # retried at the next full comparison
            log.warning("%s", exc)
            return
        self._nss_dirty = False

    def _ensure_main_files(self) -> None:
        if not self._main_files_checked:
            self._files.ensure_main_files()
            if self._updown is not None:
                events.write_script(*self._updown)  # before any connection that names it is added
            self._main_files_checked = True

    # -- events ------------------------------------------------------------------------------------

    def start_events(self, on_change: Callable[[frozenset[str] | None], None]) -> None:
        """SA changes arrive as hints from our updown command (events.py), through the monitor's
        unixctl server; pluto restarts from an inotify watch on its run directory."""
        import ovs.unixctl

        def hint(conn, argv, _aux) -> None:
            peering, what = events.peering_of_hint(argv)
            if peering is None:
                log.warning("%s", what)
                conn.reply_error("not one of our connections\n")
                return
            log.debug("%s", what)
            on_change(frozenset((peering,)))
            conn.reply(None)

        if self._updown is not None:
            ovs.unixctl.command_register(events.NOTIFY_COMMAND, "CONNECTION [VERB]", 1, 2, hint, None)
        self._follow_log(on_change)
        try:
            watch = events.DirectoryWatch(os.path.dirname(self.paths.ctl))
        except OSError as exc:
            log.warning("cannot watch %s for pluto restarts (%s): they are noticed at the next full look",
                        os.path.dirname(self.paths.ctl), exc)
            on_change(None)
            return
        self._watches.append(watch)
        thread = threading.Thread(target=self._watch_restarts, args=(watch, on_change), name="pluto-watch",
                                  daemon=True)
        thread.start()

    def _watch_restarts(self, watch: events.DirectoryWatch, on_change: Callable[[frozenset[str] | None], None]) -> None:
        def started() -> None:
            self._follow_log(on_change)
            on_change(None)

        def restarted() -> None:
            self.forget_daemon_state()
            log.info("pluto at %s restarted: comparing everything again", self.paths.ctl)
            started()

        try:
            events.watch_restarts(watch, self._identity, restarted, started)
        finally:
            watch.release()

    def _follow_log(self, on_change: Callable[[frozenset[str] | None], None]) -> None:
        """Follow pluto's log file, if it has one (once per file; see events.py for why)."""
        path = events.pluto_logfile(_read_pid(self.paths.pidfile), self.paths.root_conf)
        if path is None or path == self._log_followed:
            return
        try:
            watch = events.DirectoryWatch(path)
        except OSError as exc:
            log.info("cannot follow pluto's log %s (%s)", path, exc)
            return
        self._log_followed = path
        self._watches.append(watch)
        log.info("following pluto's log %s for IKE SA changes", path)
        thread = threading.Thread(target=events.follow_log, name="pluto-log", daemon=True,
                                  args=(path, watch, lambda names: on_change(frozenset(names))))
        thread.start()

    def _identity(self) -> tuple[int, int, int | None] | None:
        try:
            stat = os.stat(self.paths.ctl)
        except OSError:
            return None
        return stat.st_ino, stat.st_ctime_ns, _read_pid(self.paths.pidfile)

    def _daemon_id(self) -> str | None:
        """pluto's pid and its control socket's inode: a restarted pluto has new ones."""
        try:
            inode = os.stat(self.paths.ctl).st_ino
        except OSError:
            return None
        return f"{_read_pid(self.paths.pidfile)}:{inode}"

    def forget_daemon_state(self) -> None:
        """A restarted pluto may not have our secrets, nor the connections we loaded."""
        with self._lock:
            self._loaded = None  # the next observe() reads the whole list again
        self._secrets_fresh = False
        self._nss_dirty = True

    def close(self) -> None:
        for watch in self._watches:
            watch.close()


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None
