"""The one way the daemon and the PKI tool write a file: all at once, with its final mode from the start.

Every write goes to a temporary file created with its final mode (0600 for secrets), is fsynced,
and only then appears under its real name, so a reader never sees a half-written file and a
private key or PSK is never readable by others, not even for an instant.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .errors import FileWriteError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def write_atomic(path: Path, data: bytes, *, secret: bool, overwrite: bool) -> None:
    """Write `data` to `path` all at once; with overwrite=False an existing file is kept."""
    mode = SECRET_MODE if secret else PUBLIC_MODE
    directory = path.parent if str(path.parent) else Path(".")
    temp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        # The mode is given at creation: there is no moment where the file exists with
        # the umask's (possibly world-readable) default permissions.
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as error:
        raise FileWriteError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            # link() fails when the name exists, so two writers can never clobber each other.
            os.link(temp, path)
            os.unlink(temp)
        _fsync_dir(directory)
    except FileExistsError:
        _discard(temp)
        raise FileWriteError(f"{path} already exists (use --force to overwrite it)") from None
    except OSError as error:
        _discard(temp)
        raise FileWriteError(f"cannot write {path}: {error.strerror or error}") from None


def _discard(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; not every filesystem lets a directory be fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
