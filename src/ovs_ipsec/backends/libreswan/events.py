"""pluto's events, without polling it: its updown command for SA changes, inotify for restarts.

pluto has no event socket, but it runs a connection's `leftupdown=` command on every SA and route
change (PLUTO_VERB up-host, down-host, route-host, ..., PLUTO_CONNECTION: which connection).
Ours is a small script (written here, beside our connection files) that first runs LibreSwan's
own default, `ipsec _updown`, unchanged, so whatever it does for a connection still happens, and
then tells the monitor through its unixctl socket which connection changed:
`ovs-appctl -t <socket> ipsec/lsw-event <connection> <verb>`, in the background, so pluto (which
waits for the script) never waits for the monitor.

What arrives that way is a hint, not a fact: anyone who can reach the socket can send anything,
so only names that full-match our own naming are taken, and they only make the monitor look at
that connection in pluto again.

pluto runs the updown command only for Child SAs it installed in the kernel: an IKE SA coming up
or going away on its own (a kernel without ESP, as on the test machine, or a Child SA the kernel
refused) tells nothing. When pluto writes its log to a file (`--logfile` on its command line or
`logfile=` in ipsec.conf), that file is followed too, with inotify: every state line
(`"<connection>" #<serial>: ...`) naming one of ours is the same kind of hint. With pluto logging
to syslog only, those IKE-only changes are seen at the periodic full look.

A restarted pluto makes a new control socket and pid file; an inotify watch on their directory
reports that (the directory's parent is watched until the directory exists). No timer runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import select
import struct
from collections.abc import Callable, Iterable

from ...errors import BackendError
from ...text import shown
from .render import FILE_HEADER, split_name

log = logging.getLogger(__name__)

NOTIFY_COMMAND = "ipsec/lsw-event"
UPDOWN_NAME = "ovsipsec-updown"
# The script's path and the tools it calls are written into a shell script that pluto runs through
# `sh -c`: nothing but plain path characters.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./-]{1,400}")
_VERB = re.compile(r"[a-z0-9-]{1,32}")

# <sys/inotify.h>
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x2, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_IGNORED, _IN_ONLYDIR, _IN_NONBLOCK, _IN_CLOEXEC = 0x8000, 0x1000000, 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")
_WATCHED = _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CLOSE_WRITE | _IN_MODIFY \
    | _IN_DELETE_SELF | _IN_MOVE_SELF
# A state line of pluto's log: `"<connection>"[<instance>] #<serial>: ...` (4.x and 5.x).
_STATE_LOG_LINE = re.compile(r'"(?P<name>ovsipsec-[^"\s]{1,300})"(?:\[\d+\])? #\d+: ')
_LOG_CHUNK = 1 << 18
_LOGFILE_SETTING = re.compile(r"^\s+logfile\s*=\s*\"?(?P<path>/[^\s\"]+)\"?\s*$", re.MULTILINE)


def updown_script(ipsec: str, appctl: str, unixctl: str) -> str:
    """The script pluto runs as our connections' updown command. Every argument is a plain path."""
    for path in (ipsec, appctl, unixctl):
        if not _PLAIN_PATH.fullmatch(path):
            raise BackendError(f"cannot write {shown(path)} into pluto's updown script (plain paths only)")
    return (f"#!/bin/sh\n{FILE_HEADER}"
            "# pluto runs this on SA and route changes of our connections (leftupdown=). LibreSwan's\n"
            "# own updown first, as without it; then a hint to the monitor, which looks again.\n"
            f'{ipsec} _updown "$@"\n'
            "status=$?\n"
            'case "$PLUTO_CONNECTION" in\n'
            f'ovsipsec-*) {appctl} --timeout=5 -t {unixctl} {NOTIFY_COMMAND} "$PLUTO_CONNECTION" "$PLUTO_VERB" '
            ">/dev/null 2>&1 </dev/null & ;;\n"
            "esac\n"
            "exit $status\n")


def write_script(path: str, text: str) -> None:
    """Mode 0755, replaced atomically (pluto may be running it right now), only when it changed."""
    try:
        with open(path) as handle:
            if handle.read() == text and os.access(path, os.X_OK):
                return
    except OSError:
        pass
    temp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(temp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o755)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o755)  # whatever the umask: pluto must be able to run it
        os.replace(temp, path)
    except OSError as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise BackendError(f"cannot write {path}: {exc.strerror or exc}") from exc


def peering_of_hint(argv: list[str]) -> tuple[str | None, str]:
    """(peering, what to log) for `ipsec/lsw-event CONNECTION [VERB]`; peering None: refused."""
    name = argv[0] if argv else ""
    verb = argv[1] if len(argv) > 1 else ""
    parts = split_name(name)
    if parts is None or (verb and not _VERB.fullmatch(verb)):
        return None, f"refused a pluto event hint for {shown(name)} ({shown(verb)}): not one of our connections"
    return parts[0], f"pluto: {verb or 'event'} on {name}"


class DirectoryWatch:
    """inotify on a directory or a file (or, while it does not exist, on the nearest parent that
    does); blocks without a timer."""

    def __init__(self, directory: str) -> None:
        self._directory = directory  # or a file
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._stop_read, self._stop_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watching: str | None = None
        self._arm()

    def _arm(self) -> None:
        """Watch the directory, else the nearest parent that exists (it will show the creation)."""
        target = self._directory
        while True:
            flags = _WATCHED | (_IN_ONLYDIR if target != self._directory else 0)
            wd = self._add_watch(self._fd, os.fsencode(target), flags)
            if wd >= 0:
                self._watching = target
                return
            code = ctypes.get_errno()
            parent = os.path.dirname(target)
            if code not in (errno.ENOENT, errno.ENOTDIR) or parent == target:
                raise OSError(code, f"inotify_add_watch {target}")
            target = parent

    def wait(self) -> bool:
        """Block until something changed in the directory (true) or close() was called (false)."""
        while True:
            readable, _, _ = select.select([self._fd, self._stop_read], [], [])
            if self._stop_read in readable:
                return False
            if self._consume():
                return True

    def settle(self, seconds: float) -> None:
        """Let a burst of changes (a starting pluto writes its socket, then its pid) finish."""
        select.select([self._stop_read], [], [], seconds)
        while self._consume():
            pass

    def _consume(self) -> bool:
        """Read the pending events (true if any), re-arming on what exists now when the watched
        directory went or a parent changed. Events are never dropped unread: `makedirs` of the run
        directory creates it a level at a time, and a parent's event drained without re-arming
        left the watch on a level above it for good."""
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return False
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED) or self._watching != self._directory:
                self._arm()  # gone, or a parent created something: watch what exists now
        return bool(data)

    def close(self) -> None:
        try:
            os.write(self._stop_write, b"x")
        except OSError:
            pass

    def release(self) -> None:
        for fd in (self._fd, self._stop_read, self._stop_write):
            try:
                os.close(fd)
            except OSError:
                pass


def watch_restarts(watch: DirectoryWatch, identity: Callable[[], object],
                   on_restart: Callable[[], None], on_first: Callable[[], None]) -> None:
    """Call on_first() once pluto is there, then on_restart() whenever a different pluto is."""
    seen = identity()
    if seen is not None:
        on_first()
    while watch.wait():
        watch.settle(0.2)
        current = identity()
        if current is None or current == seen:
            continue
        if seen is None:
            on_first()
        else:
            on_restart()
        seen = current


def pluto_logfile(pid: int | None, config: str) -> str | None:
    """The file pluto logs to: `--logfile` on its command line, else `logfile=` in ipsec.conf."""
    if pid is not None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().decode(errors="replace").split("\0")
        except OSError:
            argv = []
        for index, arg in enumerate(argv):
            if arg == "--logfile" and index + 1 < len(argv) and _PLAIN_PATH.fullmatch(argv[index + 1]):
                return argv[index + 1]
            if arg.startswith("--logfile=") and _PLAIN_PATH.fullmatch(arg[len("--logfile="):]):
                return arg[len("--logfile="):]
    try:
        with open(config) as handle:
            match = _LOGFILE_SETTING.search(handle.read())
    except OSError:
        return None
    return match["path"] if match and _PLAIN_PATH.fullmatch(match["path"]) else None


def peerings_named(log_lines: Iterable[bytes]) -> set[str]:
    """The peerings of ours that pluto's state lines name; any other line names none."""
    peerings = set()
    for line in log_lines:
        match = _STATE_LOG_LINE.search(line.decode(errors="replace"))
        parts = split_name(match["name"]) if match else None
        if parts:
            peerings.add(parts[0])
    return peerings


def follow_log(path: str, watch: DirectoryWatch, on_names: Callable[[set[str]], None]) -> None:
    """Read what pluto appends to its log, from the end as it is now; call on_names(peerings)
    with the peerings its new state lines name. Rotation and truncation start over at 0."""
    handle = None
    position = 0
    inode = None
    try:
        try:
            handle = open(path, "rb")
            position = handle.seek(0, os.SEEK_END)
            inode = os.fstat(handle.fileno()).st_ino
        except OSError:
            pass
        tail = b""
        while watch.wait():
            watch.settle(0.02)  # pluto writes line by line: read a burst at once, not line by line
            try:
                current = os.stat(path)
            except OSError:
                continue
            if handle is None or current.st_ino != inode or current.st_size < position:
                if handle is not None:
                    handle.close()
                handle = open(path, "rb")
                inode, position, tail = current.st_ino, 0, b""
            handle.seek(position)
            peerings: set[str] = set()
            while data := handle.read(_LOG_CHUNK):  # a bulk load logs megabytes: a chunk at a time
                position += len(data)
                lines = (tail + data).split(b"\n")
                tail = lines.pop()[-4096:]  # a line still being written
                peerings |= peerings_named(lines)
            if peerings:
                on_names(peerings)
    except OSError as exc:
        log.warning("stopped following pluto's log %s: %s", path, exc)
    finally:
        if handle is not None:
            handle.close()
        watch.release()
