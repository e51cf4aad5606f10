"""lab/run.sh entry point: build (cached), boot once, run the scenarios, report."""

import argparse
import fcntl
import shutil
import subprocess
import sys
import time

from . import image, paths, report, vm
from .util import LabError, log


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab/run.sh", description=__doc__)
    p.add_argument("--only", help="comma-separated scenario names (default: all of lab/scenarios.toml)")
    p.add_argument("--build-only", action="store_true", help="build or refresh the cached images, do not boot")
    p.add_argument("--shell", action="store_true",
                   help="boot to an interactive root shell on the serial console instead (Ctrl-A X quits)")
    p.add_argument("--rebuild-base", action="store_true", help="debootstrap the base image again")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the selected scenarios N times in the same boot (to catch flaky ones)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds before the VM is stopped (default 1200)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return locked_main(args)
    except LabError as e:
        log(f"ERROR: {e}")
    except subprocess.CalledProcessError as e:
        log(f"ERROR: {' '.join(map(str, e.cmd))} exited {e.returncode}")
    return 2


def locked_main(args) -> int:
    scenarios = load_scenarios()
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {s["name"] for s in scenarios}
        if unknown:
            raise LabError(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        scenarios = [s for s in scenarios if s["name"] in names]
    paths.CACHE.mkdir(parents=True, exist_ok=True)
    with open(paths.CACHE / ".lock", "w") as lock:
        # One lab at a time: two VMs would share the cache and results and starve 2 cores.
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another lab run holds the lock; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return run(args, scenarios)


def load_scenarios() -> list:
    """lab/scenarios.toml, checked on the host with the guest's own rules before any boot."""
    sys.path.insert(0, str(paths.GUEST))
    try:
        import scenario
    finally:
        sys.path.pop(0)
    try:
        return [s.summary() for s in scenario.load(paths.SCENARIOS)]
    except (ValueError, TypeError) as e:
        raise LabError(f"{paths.SCENARIOS}: {e}") from e


def run(args, scenarios: list) -> int:
    t0 = time.monotonic()
    images = image.build_all(force_base=args.rebuild_base)
    build_seconds = round(time.monotonic() - t0, 1)
    log(f"images ready in {build_seconds}s (kernel {images.kernel.version}, base {images.base.parent.name}, "
        f"overlay {images.overlay.stem})")
    if args.build_only:
        return 0

    # Keep only the last run's results: console, logs and pcaps of every scenario.
    shutil.rmtree(paths.RESULTS, ignore_errors=True)
    paths.RESULTS.mkdir(parents=True)
    kernel_args = [f"lab_only={','.join(s['name'] for s in scenarios)}", f"lab_repeat={args.repeat}"]
    if args.shell:
        return vm.boot(images, paths.RESULTS, [*kernel_args, "lab_shell=1"], args.timeout, interactive=True)

    log(f"booting the VM for {len(scenarios)} scenario(s); console: {paths.RESULTS / 'console.log'}")
    t1 = time.monotonic()
    qemu_rc = vm.boot(images, paths.RESULTS, kernel_args, args.timeout)
    vm_seconds = round(time.monotonic() - t1, 1)
    kernel, results = report.collect(paths.RESULTS / "console.log", scenarios)
    guest_exit = (paths.RESULTS / "guest-exit").read_text().strip() if (paths.RESULTS / "guest-exit").exists() else None
    report.write(paths.RESULTS / "latest.json", kernel or images.kernel.version, results,
                 {"build_seconds": build_seconds, "vm_seconds": vm_seconds, "qemu_exit": qemu_rc,
                  "guest_exit": guest_exit})
    print(report.table(results))
    log(f"results: {paths.RESULTS / 'latest.json'} (build {build_seconds}s, VM {vm_seconds}s)")
    if guest_exit != "0":
        log(f"the guest runner did not finish cleanly (exit {guest_exit}); see {paths.RESULTS / 'console.log'}")
        return 2
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
