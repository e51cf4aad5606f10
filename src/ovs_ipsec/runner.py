"""The one way to run an external command: argv list, timeout, pipes always drained, raises."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from .errors import CommandError


@dataclass(frozen=True)
class Completed:
    stdout: str
    stderr: str
    returncode: int = 0  # only ever non-zero with check=False


def run(argv: list[str], timeout: float = 30.0, input_text: str | None = None,
        check: bool = True, stdout_file: IO[str] | None = None) -> Completed:
    """Run argv and return its output; raise CommandError on failure or timeout.

    communicate() reads both pipes to the end, so a chatty child can never block on a full pipe
    (upstream's deadlock with LibreSwan 5). On timeout the child is killed *and reaped*.
    `stdout_file`: the child writes its output there instead (Completed.stdout is then empty), so
    megabytes of it never pass through this process's memory at once.
    """
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                                stdout=stdout_file or subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise CommandError(argv, f"could not be started ({exc.strerror})") from exc
    try:
        stdout, stderr = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise CommandError(argv, f"timed out after {timeout:g} s") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, f"exited with status {proc.returncode}", stderr)
    return Completed(stdout or "", stderr, proc.returncode)


# What adapters receive instead of importing `run`: tests hand them a scripted stand-in.
Runner = Callable[..., Completed]
