"""lab/run.sh entry point: build (cached), boot once, run the scenarios, report."""

import argparse
import fcntl
import shutil
import subprocess
import sys
import time

from . import hostimage, image, paths, report, vm
from .util import LabError, log


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab/run.sh", description=__doc__)
    p.add_argument("--only", help="comma-separated scenario names (default: all of lab/scenarios.toml "
                   "but the extended ones)")
    p.add_argument("--extended", action="store_true",
                   help="also the scenarios marked extended = true (slower; not part of make check)")
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
    elif not args.extended:
        scenarios = [s for s in scenarios if not s.get("extended")]
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
    """Network-namespace scenarios boot the base image; systemd-host scenarios (host = "systemd")
    boot the host image (labhost/hostimage.py), in a second boot whose files go to
    lab/results/systemd/. One latest.json lists both."""
    netns = [s for s in scenarios if s.get("host", "netns") == "netns"]
    systemd = [s for s in scenarios if s.get("host") == "systemd"]
    t0 = time.monotonic()
    kernel = image.build_kernel()
    initramfs = image.build_initramfs(kernel)
    overlay = image.build_overlay(image.build_pydeps())
    boots = []
    if netns or not systemd:
        boots.append(("netns", netns, image.Images(kernel, initramfs, image.build_base(kernel, force=args.rebuild_base),
                                                   overlay), paths.RESULTS))
    if systemd:
        host = hostimage.build_host_image(kernel, hostimage.build_deb())
        boots.append(("systemd", systemd, image.Images(kernel, initramfs, host, overlay), paths.RESULTS / "systemd"))
    build_seconds = round(time.monotonic() - t0, 1)
    log(f"images ready in {build_seconds}s (kernel {kernel.version}, "
        + ", ".join(f"{name} root {images.base.parent.name}" for name, _, images, _ in boots)
        + f", overlay {overlay.stem})")
    if args.build_only:
        return 0

    # Keep only the last run's results: console, logs and pcaps of every scenario.
    shutil.rmtree(paths.RESULTS, ignore_errors=True)
    paths.RESULTS.mkdir(parents=True)
    if args.shell:
        name, selected, images, results = boots[-1]
        results.mkdir(parents=True, exist_ok=True)
        kernel_args = [f"lab_only={','.join(s['name'] for s in selected)}", f"lab_repeat={args.repeat}", "lab_shell=1"]
        return vm.boot(images, results, kernel_args, args.timeout, interactive=True)

    all_results, extra, rc = [], {"build_seconds": build_seconds}, 0
    for name, selected, images, results in boots:
        results.mkdir(parents=True, exist_ok=True)
        kernel_args = [f"lab_only={','.join(s['name'] for s in selected)}", f"lab_repeat={args.repeat}"]
        log(f"booting the {name} VM for {len(selected)} scenario(s); console: {results / 'console.log'}")
        t1 = time.monotonic()
        qemu_rc = vm.boot(images, results, kernel_args, args.timeout)
        vm_seconds = round(time.monotonic() - t1, 1)
        found_kernel, found = report.collect(results / "console.log", selected)
        guest_exit = (results / "guest-exit").read_text().strip() if (results / "guest-exit").exists() else None
        all_results += found
        suffix = "" if name == "netns" else f"_{name}"
        extra.update({f"vm_seconds{suffix}": vm_seconds, f"qemu_exit{suffix}": qemu_rc,
                      f"guest_exit{suffix}": guest_exit})
        extra.setdefault("kernel", found_kernel or kernel.version)
        if guest_exit != "0":
            log(f"the {name} guest runner did not finish cleanly (exit {guest_exit}); see {results / 'console.log'}")
            rc = 2
    kernel_name = extra.pop("kernel")
    report.write(paths.RESULTS / "latest.json", kernel_name, all_results, extra)
    print(report.table(all_results))
    log(f"results: {paths.RESULTS / 'latest.json'} (build {build_seconds}s, "
        + ", ".join(f"{k} {v}s" for k, v in extra.items() if k.startswith("vm_seconds")) + ")")
    if rc:
        return rc
    return 0 if all(r["pass"] for r in all_results) else 1


if __name__ == "__main__":
    sys.exit(main())
