"""Outbound sequence numbers that survive restarts, so a manual key never repeats a GCM nonce.

Our IV is the sequence number. With a manual key the same key is in force after a restart, and
starting again at 1 would encrypt new packets under (key, nonce) pairs already used: with GCM
that reveals the XOR of two plaintexts and the authentication key (RFC 4106 section 9 asks
for "extraordinary measures" against exactly this). So sequence numbers are reserved in blocks:
before the first packet of a block is sent, the end of the block is written to a file (written
to a temporary file, fsynced, renamed). After a restart, or a crash at any point, sending resumes
after the last reserved block: a number is never used twice, at the cost of skipping up to one
block per restart (2^20 by default, of the 2^32 an SA has). The receiver's anti-replay window
only ever sees numbers grow.

The file is named by a digest of the SPI and key material (never the key itself) and lives in a
directory only root can read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import OvsIpsecError
from .esp import MAX_SEQ, AeadKey

DEFAULT_BLOCK = 1 << 20
_MAGIC = b"ovs-ipsec userspace ESP sequence numbers\x00"


class SequenceError(OvsIpsecError):
    """Sequence numbers cannot be reserved (file system) or the SA has used them all."""


def reservation_name(spi: int, key: AeadKey) -> str:
    digest = hashlib.sha256(_MAGIC + spi.to_bytes(4, "big") + key.key + key.salt).hexdigest()
    return f"seq-{digest[:32]}"


class SequenceStore:
    """Reservation files in one directory (created 0700)."""

    def __init__(self, directory: Path, block: int = DEFAULT_BLOCK) -> None:
        if block < 1:
            raise ValueError("a reservation block holds at least one sequence number")
        self.directory = directory
        self.block = block

    def _path(self, spi: int, key: AeadKey) -> Path:
        return self.directory / reservation_name(spi, key)

    def last_reserved(self, spi: int, key: AeadKey) -> int:
        """The highest number an earlier run may have used (0: this SA never sent)."""
        try:
            text = self._path(spi, key).read_text().strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise SequenceError(f"cannot read the sequence reservation in {self.directory}: {exc.strerror}") from exc
        if not text.isdigit() or int(text) > MAX_SEQ:
            raise SequenceError(f"the sequence reservation file {self._path(spi, key).name} in {self.directory} "
                                "is corrupt; remove it only after changing the SA's key")
        return int(text)

    def reserve(self, spi: int, key: AeadKey, needed: int) -> int:
        """Reserve numbers up to at least `needed`; return the new upper bound (inclusive)."""
        if needed > MAX_SEQ:
            raise SequenceError(f"outbound SA 0x{spi:08x} has used all 2^32-1 sequence numbers; "
                                "configure a new esp_out_spi and esp_out_key")
        upto = min(MAX_SEQ, needed + self.block - 1)
        path = self._path(spi, key)
        temporary = path.with_name(path.name + ".tmp")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, f"{upto}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)
            directory_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
        except OSError as exc:
            raise SequenceError(f"cannot reserve sequence numbers in {self.directory}: {exc.strerror}") from exc
        return upto
