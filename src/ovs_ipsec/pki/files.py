"""File access for the PKI commands: the ovs-pki folder layout, reads and atomic writes.

Every write goes to a temporary file created with its final mode (0600 for secrets), is
fsynced, and only then appears under its real name, so a reader never sees a half-written
file and a private key is never readable by others, not even for an instant.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import PkiError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
PUBLIC_DIR_MODE = 0o755

DEFAULT_PKI_DIR = Path("/var/lib/openvswitch/pki")  # Debian's ovs-pki default
# ovs-pki calls its two authorities "<type>ca"; `sign NAME switch` uses switchca.
CA_KINDS = ("switch", "controller")
DEFAULT_DAYS = 3650  # what ovs-pki gives both its CAs and the certificates they sign


@dataclass(frozen=True)
class PkiLayout:
    """Where ovs-pki keeps things under its PKI directory (default /var/lib/openvswitch/pki)."""

    root: Path

    def ca_dir(self, kind: str) -> Path:
        if kind not in CA_KINDS:
            raise PkiError(f"unknown certificate type '{kind}' (expected one of: {', '.join(CA_KINDS)})")
        return self.root / f"{kind}ca"

    def ca_cert(self, kind: str) -> Path:
        return self.ca_dir(kind) / "cacert.pem"

    def ca_private_dir(self, kind: str) -> Path:
        return self.ca_dir(kind) / "private"

    def ca_key(self, kind: str) -> Path:
        return self.ca_private_dir(kind) / "cakey.pem"

    def newcerts(self, kind: str) -> Path:
        """One copy of every issued certificate, named by serial, as `openssl ca` keeps them."""
        return self.ca_dir(kind) / "newcerts"

    def index(self, kind: str) -> Path:
        """The `openssl ca` database: one line per issued certificate."""
        return self.ca_dir(kind) / "index.txt"


@dataclass(frozen=True)
class NameFiles:
    """The files `req`, `sign` and `self-sign` use for NAME, in the current directory like ovs-pki."""

    name: str

    @property
    def private_key(self) -> Path:
        return Path(f"{self.name}-privkey.pem")

    @property
    def request(self) -> Path:
        return Path(f"{self.name}-req.pem")

    @property
    def certificate(self) -> Path:
        return Path(f"{self.name}-cert.pem")


def read_bytes(path: Path) -> bytes:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            # Opening a FIFO would block: refuse anything that is not a plain file.
            raise PkiError(f"cannot read {path}: not a regular file")
        return path.read_bytes()
    except OSError as error:
        raise PkiError(f"cannot read {path}: {error.strerror or error}") from None


def make_dir(path: Path, mode: int) -> None:
    """Create a directory (and its parents) if missing; tighten the mode of a private one."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        if mode == PRIVATE_DIR_MODE:
            # mkdir honours the umask only downwards, but an existing directory keeps
            # whatever it had: make sure the one holding CA keys is not browsable.
            os.chmod(path, mode)
    except OSError as error:
        raise PkiError(f"cannot create directory {path}: {error.strerror or error}") from None


def refuse_existing(paths: tuple[Path, ...], force: bool) -> None:
    """ovs-pki never overwrites without --force; check up front so nothing is half done."""
    if force:
        return
    for path in paths:
        if os.path.lexists(path):
            raise PkiError(f"{path} already exists (use --force to overwrite it)")


def append_line(path: Path, line: str) -> None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, PUBLIC_MODE)
        with os.fdopen(fd, "a", encoding="utf-8") as stream:
            stream.write(line)
    except OSError as error:
        raise PkiError(f"cannot write {path}: {error.strerror or error}") from None
