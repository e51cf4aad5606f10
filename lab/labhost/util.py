"""Small helpers shared by the build and boot steps: logging, commands, content hashes."""

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

_T0 = time.monotonic()


class LabError(Exception):
    """The lab itself cannot run (missing tool, failed build): lab/run.sh exits 2."""


def log(msg: str) -> None:
    print(f"[lab {time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, fail loudly (with its output) when it fails."""
    kwargs.setdefault("check", True)
    try:
        return subprocess.run([str(a) for a in argv], **kwargs)
    except subprocess.CalledProcessError as e:
        for stream in (e.stdout, e.stderr):
            if stream:
                sys.stderr.write(stream if isinstance(stream, str) else stream.decode(errors="replace"))
        raise


def output(argv: list) -> str:
    return run(argv, capture_output=True, text=True).stdout


class Timer:
    """`with Timer("debootstrap"):` logs how long a build step took."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t = time.monotonic()
        log(f"{self.what} ...")
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            log(f"{self.what} done in {time.monotonic() - self.t:.1f}s")


def digest(*parts) -> str:
    """A short stable hash of strings, bytes and file trees (paths are hashed by content)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            for f in _files(part):
                h.update(str(f.relative_to(part.parent)).encode() + b"\0")
                h.update(f.read_bytes() + b"\0")
        else:
            h.update((part if isinstance(part, bytes) else str(part).encode()) + b"\0")
    return h.hexdigest()[:16]


def _files(root: Path):
    if root.is_file():
        yield root
        return
    for f in sorted(root.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
            yield f


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully built directory into place so an interrupted build never looks done."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def prune(parent: Path, keep: str) -> None:
    """Delete stale cache entries next to the current one (the cache keeps one of each)."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name != keep:
            log(f"removing stale cache entry {entry}")
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
