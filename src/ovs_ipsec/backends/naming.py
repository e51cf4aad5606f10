"""What every backend names the same way: the ownership prefix, parameter digests, directions.

Names are the ownership marker (only `ovsipsec-...` objects are ever changed or removed) and carry
a digest of the parameters they stand for, so unchanged configuration renders unchanged names.
"""

from __future__ import annotations

import hashlib
import json

from ..model import Selector

OWNER_PREFIX = "ovsipsec-"


def is_ours(name: str) -> bool:
    return name.startswith(OWNER_PREFIX)


def digest(value: object, length: int) -> str:
    """A short stable digest of a JSON-able value; bytes (certificates) enter by their SHA-256."""
    canonical = json.dumps(value, sort_keys=True, default=_bytes_digest).encode()
    return hashlib.sha256(canonical).hexdigest()[:length]


def direction(selector: Selector) -> str:
    """`gre`, or for UDP/TCP tunnels `out` (to the peer's port) and `in` (to ours)."""
    if selector.protocol == "gre":
        return "gre"
    return "out" if selector.remote_port else "in"


def _bytes_digest(value: object) -> str:
    if isinstance(value, bytes):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    raise TypeError(f"cannot digest {type(value).__name__}")
