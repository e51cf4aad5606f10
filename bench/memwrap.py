"""Run our monitor with tracemalloc on; SIGUSR2 writes where its live memory was allocated.

    python bench/memwrap.py OUT_FILE monitor DATABASE ...   # the monitor's own arguments follow

For bench/profile.py --phase memory only: a measuring harness, never how the monitor is run.
The dump lists the biggest allocation sites (file:line, live bytes, blocks) and the same grouped
by file, so what holds the memory can be named.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import tracemalloc


def dump(path: str, snapshot: tracemalloc.Snapshot | None = None) -> None:
    if snapshot is None:
        snapshot = tracemalloc.take_snapshot()
    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    total = sum(stat.size for stat in snapshot.statistics("filename"))
    with open(path, "w") as out:
        out.write(f"traced live memory: {total / 2**20:.1f} MiB\n\n-- by file --\n")
        for stat in snapshot.statistics("filename")[:25]:
            out.write(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d} blocks  {stat.traceback[0].filename}\n")
        out.write("\n-- by line --\n")
        for stat in snapshot.statistics("lineno")[:60]:
            frame = stat.traceback[0]
            out.write(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d} blocks  {frame.filename}:{frame.lineno}\n")
        out.write("\n-- by call chain (5 frames) --\n")
        for stat in snapshot.statistics("traceback")[:15]:
            out.write(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d} blocks\n")
            for line in stat.traceback.format(limit=5):
                out.write(f"    {line}\n")


class PeakWatch:
    """What was live at the traced peak: the high-water mark is made by transients that are gone
    by the time SIGUSR2 asks. Every 20 ms the traced total is read; when it has grown by 5 % over
    the last snapshot's, a new snapshot replaces it (each stalls the monitor for a moment)."""

    def __init__(self) -> None:
        self.snapshot: tracemalloc.Snapshot | None = None
        self.total = 0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(0.02)
            current = tracemalloc.get_traced_memory()[0]
            if current > self.total * 1.05 and current > 20 * 2**20:
                self.snapshot, self.total = None, current  # let the old one go before the new one
                self.snapshot = tracemalloc.take_snapshot()


def main() -> None:
    out = sys.argv[1]
    tracemalloc.start(5)
    peak = PeakWatch()

    def on_signal(_signum, _frame) -> None:
        dump(out + ".peak", peak.snapshot)
        dump(out)

    signal.signal(signal.SIGUSR2, on_signal)
    from ovs_ipsec.cli.main import main as monitor_main

    sys.exit(monitor_main(sys.argv[2:]))


if __name__ == "__main__":
    main()
