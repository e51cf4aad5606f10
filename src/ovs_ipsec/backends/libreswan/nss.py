"""pluto's certificates: the NSS database, through certutil and pk12util (the runner's timeout on each).

Only nicknames with our prefix are ever changed or deleted. A private key reaches NSS through a
PKCS#12 file that exists only for the duration of the import, in a fresh mode-0700 directory,
itself mode 0600 and encrypted with a random password (upstream wrote an unencrypted
/tmp/<name>.p12 with the daemon's umask).
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import shutil
import tempfile

from ...errors import BackendError, CommandError
from ...runner import Runner, run
from . import parse

log = logging.getLogger(__name__)

TRUST_PEER = "P,P,P"  # a pinned peer certificate: trusted as itself, not as a CA
TRUST_CA = "CT,,"


class NssDatabase:
    def __init__(self, directory: str, timeout: float, run: Runner = run) -> None:
        self._command = run
        self.directory = directory
        self._db = f"sql:{directory}"
        self._timeout = timeout
        self._known: dict[str, str] = {}  # nickname -> base64 DER we made sure is its only certificate

    def _run(self, what: str, argv: list[str], input_text: str | None = None, check: bool = True):
        try:
            return self._command(argv, timeout=self._timeout, input_text=input_text, check=check)
        except CommandError as exc:
            raise BackendError(f"NSS database {self.directory}: cannot {what}: {exc}") from exc

    def ensure(self, nickname: str, cert_pem: bytes, trust: str, key_pem: bytes | None = None) -> bool:
        """Make `cert_pem` (and its key) the only certificate under `nickname`; true if it changed."""
        wanted = _der_b64(cert_pem)
        if self._known.get(nickname) == wanted:
            return False
        present = self._certificates(nickname)
        if present == [wanted] and (key_pem is None or self._has_key(nickname)):
            self._known[nickname] = wanted
            return False
        self.delete(nickname, with_key=key_pem is not None)
        if key_pem is None:
            self._run(f"import {nickname}", ["certutil", "-A", "-d", self._db, "-n", nickname, "-t", trust, "-a"],
                      input_text=cert_pem.decode())
        else:
            self._import_key(nickname, cert_pem, key_pem)
        if self._certificates(nickname) != [wanted]:
            # NSS files a certificate under the nickname its subject already has.
            raise BackendError(f"NSS database {self.directory}: the certificate for {nickname} is already "
                               "stored under another nickname; remove that entry (certutil -D)")
        self._known[nickname] = wanted
        log.info("NSS database %s: installed %s", self.directory, nickname)
        return True

    def nicknames(self) -> set[str]:
        return parse.nss_nicknames(self._run("list certificates", ["certutil", "-L", "-d", self._db]).stdout)

    def delete(self, nickname: str, with_key: bool) -> None:
        """Remove every certificate (and with_key: key) under one of our nicknames."""
        if not nickname.startswith("ovsipsec-"):
            raise ValueError(f"refusing to delete foreign NSS entry {nickname!r}")
        self._known.pop(nickname, None)
        for _ in range(16):  # one entry per call; a bound in case NSS keeps answering oddly
            if not self._certificates(nickname):
                return
            flag = "-F" if with_key and self._has_key(nickname) else "-D"
            self._run(f"delete {nickname}", ["certutil", flag, "-d", self._db, "-n", nickname], check=False)
        raise BackendError(f"NSS database {self.directory}: {nickname} could not be deleted")

    def forget(self) -> None:
        self._known.clear()

    def _certificates(self, nickname: str) -> list[str]:
        result = self._run(f"read {nickname}", ["certutil", "-L", "-d", self._db, "-n", nickname, "-a"], check=False)
        return parse.pem_blocks(result.stdout)

    def _has_key(self, nickname: str) -> bool:
        result = self._run("list keys", ["certutil", "-K", "-d", self._db, "-f", "/dev/null"], check=False)
        return any(line.rstrip().endswith(nickname) for line in result.stdout.splitlines())

    def _import_key(self, nickname: str, cert_pem: bytes, key_pem: bytes) -> None:
        # Imported here, as everywhere a PSK-only monitor does not go: cryptography and its
        # OpenSSL are 8 MB of RSS (a third of the LibreSwan monitor's at N = 1000).
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
        from cryptography.hazmat.primitives.serialization import pkcs12

        key_types = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
        password = secrets.token_hex(16)
        try:
            key = serialization.load_pem_private_key(key_pem, None)
            if not isinstance(key, key_types):
                raise BackendError(f"NSS database {self.directory}: {type(key).__name__} keys cannot be imported")
            bundle = pkcs12.serialize_key_and_certificates(
                nickname.encode(), key,
                x509.load_pem_x509_certificate(cert_pem), None,
                serialization.BestAvailableEncryption(password.encode()))
        except (ValueError, TypeError) as exc:
            raise BackendError(f"cannot package the private key for {nickname}: {exc}") from exc
        folder = tempfile.mkdtemp(prefix="ovs-ipsec-nss-")  # mode 0700, unpredictable name
        path = os.path.join(folder, "key.p12")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as stream:
                stream.write(bundle)
            self._run(f"import {nickname}", ["pk12util", "-i", path, "-d", self._db, "-W", password, "-K", ""])
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _der_b64(pem: bytes) -> str:
    blocks = parse.pem_blocks(pem.decode(errors="replace"))
    if not blocks:
        raise BackendError("not a PEM certificate")
    return "".join(base64.b64encode(base64.b64decode(blocks[0])).decode().split())
