"""lab/run.sh entry point: build (cached), boot once per distribution, run the scenarios, report."""

import argparse
import dataclasses
import fcntl
import shutil
import subprocess
import sys
import time
import tomllib

from . import hostimage, image, paths, report, vm
from .util import LabError, log


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lab/run.sh", description=__doc__)
    p.add_argument("--distro", help=f"comma-separated distributions (default: all: {', '.join(image.DISTROS)})")
    p.add_argument("--only", help="comma-separated scenario names, run on every selected distribution "
                                  "(default: each distribution's plan in lab/scenarios.toml)")
    p.add_argument("--full", action="store_true",
                   help="every scenario on every selected distribution, the extended ones too (make lab-full)")
    p.add_argument("--golden", action="store_true",
                   help="also capture the IKE daemons' outputs for tests/unit/golden (lab/results/<distro>/golden/)")
    p.add_argument("--build-only", action="store_true", help="build or refresh the cached images, do not boot")
    p.add_argument("--shell", action="store_true",
                   help="boot to an interactive root shell on the serial console instead (Ctrl-A X quits); "
                        f"one distribution (default {image.DEFAULT_DISTRO})")
    p.add_argument("--rebuild-base", action="store_true", help="debootstrap the base image again")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the selected scenarios N times in the same boot (to catch flaky ones)")
    p.add_argument("--timeout", type=float, default=1200,
                   help="seconds before a VM is stopped (default 1200, per distribution)")
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
    plan = select(args, load_scenarios(), load_plans())
    paths.CACHE.mkdir(parents=True, exist_ok=True)
    with open(paths.CACHE / ".lock", "w") as lock:
        # One lab at a time: two VMs would share the cache and results and starve 2 cores.
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another lab run holds the lock; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return run(args, plan)


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


def load_plans() -> dict:
    """[plan] of lab/scenarios.toml: {distribution: scenario names} that lab/run.sh runs without
    --full or --only; a distribution not named there runs every scenario not marked `extended`."""
    plans = tomllib.loads(paths.SCENARIOS.read_text()).get("plan", {})
    unknown = set(plans) - set(image.DISTROS)
    if unknown:
        raise LabError(f"{paths.SCENARIOS}: [plan] names unknown distribution(s) {', '.join(sorted(unknown))}")
    return plans


def select(args, scenarios: list, plans: dict) -> list:
    """[(Distro, [scenario summaries])] in the order the VMs boot."""
    names = {s["name"] for s in scenarios}
    if args.distro:
        wanted = args.distro.split(",")
        unknown = set(wanted) - set(image.DISTROS)
        if unknown:
            raise LabError(f"unknown distribution(s) {', '.join(sorted(unknown))}; known: {', '.join(image.DISTROS)}")
        distros = [image.DISTROS[d] for d in wanted]
    elif args.shell:
        distros = [image.DISTROS[image.DEFAULT_DISTRO]]
    else:
        distros = list(image.DISTROS.values())
    if args.shell and len(distros) != 1:
        raise LabError("--shell boots one distribution: name it with --distro")
    only = args.only.split(",") if args.only else None
    for chosen in [only or [], *plans.values()]:
        unknown = set(chosen) - names
        if unknown:
            raise LabError(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    plan = []
    for distro in distros:
        chosen = only or (None if args.full else plans.get(distro.name))
        selected = [s for s in scenarios if s["name"] in chosen] if chosen is not None else \
            [s for s in scenarios if args.full or not s.get("extended")]
        if distro.name not in hostimage.DISTROS:
            skipped = [s["name"] for s in selected if s.get("host") == "systemd"]
            if skipped:
                log(f"{distro.name}: no systemd host image (only {', '.join(hostimage.DISTROS)}); "
                    f"skipping {', '.join(skipped)}")
            selected = [s for s in selected if s.get("host") != "systemd"]
        plan.append((distro, selected))
    return plan


def run(args, plan: list) -> int:
    """One boot per distribution for the network-namespace scenarios (the base image), and one more
    for the systemd-host scenarios (host = "systemd": the host image, labhost/hostimage.py), whose
    files go to lab/results/<distro>-systemd/. One latest.json lists every boot."""
    boots = []   # (name, scenarios, Images, build seconds)
    for distro, scenarios in plan:
        t0 = time.monotonic()
        images = image.build_all(distro, force_base=args.rebuild_base)
        netns = [s for s in scenarios if s.get("host", "netns") == "netns"]
        systemd = [s for s in scenarios if s.get("host") == "systemd"]
        if netns or not systemd:
            boots.append((distro.name, netns, images, round(time.monotonic() - t0, 1)))
        if systemd:
            t1 = time.monotonic()
            host = hostimage.build_host_image(distro, images.kernel, hostimage.build_deb())
            boots.append((f"{distro.name}-systemd", systemd, dataclasses.replace(images, base=host),
                          round(time.monotonic() - t1, 1)))
        log(f"{distro.name}: images ready in {round(time.monotonic() - t0, 1)}s (kernel {images.kernel.version}, "
            f"base {images.base.parent.name}, overlay {images.overlay.stem})")
    if args.build_only:
        return 0

    # Keep only the last run's results: console, logs and pcaps of every scenario, per boot.
    shutil.rmtree(paths.RESULTS, ignore_errors=True)
    paths.RESULTS.mkdir(parents=True)
    if args.shell:
        name, scenarios, images, _ = boots[-1]
        folder = paths.RESULTS / name
        folder.mkdir()
        return vm.boot(images, folder, [*guest_args(args, scenarios), "lab_shell=1"], args.timeout,
                       interactive=True)

    results, runs = [], {}
    for name, scenarios, images, build_seconds in boots:
        if not scenarios:
            continue
        folder = paths.RESULTS / name
        folder.mkdir()
        log(f"{name}: booting the VM for {len(scenarios)} scenario(s); console: {folder / 'console.log'}")
        t1 = time.monotonic()
        qemu_rc = vm.boot(images, folder, guest_args(args, scenarios), args.timeout)
        vm_seconds = round(time.monotonic() - t1, 1)
        kernel, versions, found = report.collect(folder / "console.log", scenarios, images.distro.name)
        exit_file = folder / "guest-exit"
        guest_exit = exit_file.read_text().strip() if exit_file.exists() else None
        runs[name] = {"kernel": kernel or images.kernel.version, "versions": versions,
                      "build_seconds": build_seconds, "vm_seconds": vm_seconds, "qemu_exit": qemu_rc,
                      "guest_exit": guest_exit}
        results += found
        log(f"{name}: VM {vm_seconds}s, {sum(r['pass'] for r in found)}/{len(found)} passed")
    report.write(paths.RESULTS / "latest.json", results, runs)
    print(report.table(results))
    log(f"results: {paths.RESULTS / 'latest.json'} ("
        + ", ".join(f"{d}: build {r['build_seconds']}s, VM {r['vm_seconds']}s" for d, r in runs.items()) + ")")
    broken = [d for d, r in runs.items() if r["guest_exit"] != "0"]
    if broken:
        log(f"the guest runner did not finish cleanly on {', '.join(broken)}; "
            f"see {paths.RESULTS}/<boot>/console.log")
        return 2
    return 0 if all(r["pass"] for r in results) else 1


def guest_args(args, scenarios: list) -> list:
    """What the guest runner reads from the kernel command line (runner.kernel_args)."""
    extra = ["lab_golden=1"] if args.golden else []
    return [f"lab_only={','.join(s['name'] for s in scenarios)}", f"lab_repeat={args.repeat}", *extra]


if __name__ == "__main__":
    sys.exit(main())
