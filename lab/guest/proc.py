"""Running commands inside the VM: every command is logged to the scenario's commands.log.

Processes are stopped with the project's one pid helper (testsupport.procs, in the overlay).
"""

import os
import subprocess
import threading
import time
from pathlib import Path

from testsupport.procs import is_alive as alive   # noqa: F401 - re-exported for the guest modules
from testsupport.procs import stop_pid, stop_pidfile   # noqa: F401


class CommandError(RuntimeError):
    pass


class Shell:
    """Runs commands for one scenario and keeps a transcript (the first place to look on failure)."""

    def __init__(self, transcript: Path):
        self.transcript = transcript
        self._lock = threading.Lock()   # the two hosts start their daemons in parallel

    def note(self, text: str) -> None:
        """A line of the runner's own in the transcript (what it is about to do, and when)."""
        self._note(f"# {time.strftime('%T')} {text}")

    def _note(self, text: str) -> None:
        with self._lock, open(self.transcript, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def run(self, argv: list, *, netns: str = None, env: dict = None, check: bool = True,
            timeout: float = 60, log: Path = None, cwd: Path = None,
            quiet: bool = False) -> subprocess.CompletedProcess:
        """Run to completion. With `log`, output goes to that file instead of pipes: a daemon
        that --detach'es may keep inherited pipes open, and reading them would then hang.
        `quiet` leaves a successful command's output out of the transcript (status polling)."""
        argv = [str(a) for a in argv]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        full_env = dict(os.environ, **(env or {}))
        t = time.monotonic()
        where = f"(cd {cwd}) " if cwd else ""
        try:
            if log:
                with open(log, "a") as f:
                    cp = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                        timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)
                cp.stdout, cp.stderr = log.read_text(errors="replace")[-2000:], ""
            else:
                cp = subprocess.run(argv, capture_output=True, text=True, errors="replace", env=full_env,
                                    timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)
        except subprocess.TimeoutExpired as e:
            self._note(f"{where}$ {' '.join(argv)}\n  TIMEOUT after {timeout}s")
            raise CommandError(f"timed out after {timeout}s: {' '.join(argv)}") from e
        out = (cp.stdout + cp.stderr).strip()
        if quiet and cp.returncode == 0:
            out = f"({len(out)} bytes of output not kept)" if out else ""
        self._note(f"{where}$ {' '.join(argv)}  [rc={cp.returncode}, {time.monotonic() - t:.1f}s]"
                   + (("\n  " + out.replace("\n", "\n  ")) if out else ""))
        if check and cp.returncode != 0:
            raise CommandError(f"rc={cp.returncode}: {' '.join(argv)}: {out[-400:]}")
        return cp

    def spawn(self, argv: list, *, netns: str = None, env: dict = None, log: Path) -> subprocess.Popen:
        """Start a long-running process in the background; stop it with stop_pid(proc.pid)."""
        argv = [str(a) for a in argv]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self._note(f"$ {' '.join(argv)} &  (output: {log})")
        with open(log, "w") as out:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, **(env or {})), start_new_session=True)


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
