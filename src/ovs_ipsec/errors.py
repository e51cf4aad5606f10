"""The few exception types, each carrying what an operator needs to act on it."""

from __future__ import annotations


class OvsIpsecError(Exception):
    """Base class: every error the daemon reports on purpose."""


class CommandError(OvsIpsecError):
    """An external command failed or timed out."""

    def __init__(self, argv: list[str], reason: str, stderr: str = "") -> None:
        self.argv = argv
        self.reason = reason
        self.stderr = stderr
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{argv[0]} {reason}{detail}")


class BackendError(OvsIpsecError):
    """The IKE daemon refused or could not be reached for one action.

    `transport` is true when the daemon itself is unreachable (socket gone, timeout): the
    reconciler then stops the current batch instead of failing every tunnel one by one.
    """

    def __init__(self, message: str, transport: bool = False) -> None:
        self.transport = transport
        super().__init__(message)


class FileWriteError(OvsIpsecError):
    """A file could not be written (atomicfile.write_atomic); the message names it and why."""


class PkiError(OvsIpsecError):
    """A certificate operation the operator can fix; the message names the file and the problem."""
