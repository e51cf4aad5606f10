"""Processes and sockets: wait for a condition, read a pid, stop a process by its pid."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll until predicate() is truthy; return its value or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def socket_answers(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def read_pid(pidfile: Path | str) -> int | None:
    try:
        return int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_pid(pid: int, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Stop one process we started: `sig`, then SIGKILL if it is still there after `grace` seconds."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    if not wait_gone(pid, grace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_gone(pid, grace)


def stop_pidfile(pidfile: Path | str, grace: float = 5.0) -> None:
    """Stop a daemon that wrote its pid with --pidfile (ovsdb-server, ovs-vswitchd, the monitor)."""
    pid = read_pid(pidfile)
    if pid is not None:
        stop_pid(pid, grace=grace)


def kill_pidfile(pidfile: Path | str, sig: int = signal.SIGTERM) -> None:
    pid = read_pid(pidfile)
    if pid is not None:
        kill_pid(pid, sig)


def kill_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    wait_gone(pid, timeout)


def wait_gone(pid: int, timeout: float) -> bool:
    """True once the process is gone (or a zombie), False if it is still there after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children
            if finished:
                return True
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if is_zombie(pid):
            return True
        time.sleep(0.05)
    return False


def is_alive(pid: int) -> bool:
    return not is_zombie(pid)


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def live_children(pid: int) -> list[int]:
    """Children that are not zombies (upstream's monitor leaves an unreaped `ipsec status` behind)."""
    children = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tids:
        try:
            children += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return [child for child in children if not is_zombie(child)]


def unlink(*paths: Path | str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
