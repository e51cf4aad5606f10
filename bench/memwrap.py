"""Run our monitor with tracemalloc on; SIGUSR2 writes where its live memory was allocated.

    python bench/memwrap.py OUT_FILE monitor DATABASE ...   # the monitor's own arguments follow

For bench/profile.py --phase memory only: a measuring harness, never how the monitor is run.
The dump lists the biggest allocation sites (file:line, live bytes, blocks) and the same grouped
by file, so what holds the memory can be named.
"""

from __future__ import annotations

import signal
import sys
import tracemalloc


def dump(path: str) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
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


def main() -> None:
    out = sys.argv[1]
    tracemalloc.start(5)
    signal.signal(signal.SIGUSR2, lambda _signum, _frame: dump(out))
    from ovs_ipsec.cli.main import main as monitor_main

    sys.exit(monitor_main(sys.argv[2:]))


if __name__ == "__main__":
    main()
