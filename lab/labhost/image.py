"""Build the VM's pieces, each cached under CACHE/<stage>/<key> and rebuilt only when its key changes.

    kernel/     Debian's linux-image-amd64 kernel package, extracted        key: package + version
    base/       debootstrap'ed Debian 12 + LibreSwan + the kernel's modules   key: BASE_VERSION, packages,
                ext4 image                                                       libreswan, kernel
    initramfs/  busybox + the modules needed to mount the disks              key: kernel, guest/initramfs-init
    pydeps/     the project's Python dependencies, installed for cp311       key: pyproject dependencies
    overlay/    src/ + pydeps + lab/guest + scenarios, ext4 image            key: content hash of all of those

The base image is the slow part (debootstrap, about a minute) and depends on nothing in the
project, so editing the project only rebuilds the overlay (a few seconds). The VM mounts the
overlay at /opt/ovs-ipsec.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .util import LabError, Timer, digest, output, prune, replace_dir, run

SUITE = "bookworm"
# Bump when the base build below changes in a way the package list does not show.
BASE_VERSION = 1
BASE_PACKAGES = [
    "openvswitch-switch",               # ovsdb-server, ovs-vswitchd, ovs-vsctl
    "strongswan-swanctl",
    "charon-systemd",                   # the IKE daemon the monitor drives over VICI
    "libstrongswan-standard-plugins",   # gcm, openssl (AES-GCM / ECP proposals)
    "iproute2", "tcpdump", "iputils-ping", "kmod", "procps",
    "python3",                          # Debian's 3.11, runs the monitor and the guest runner
    "ovn-central", "ovn-host",          # NB/SB ovsdb-servers, ovn-northd, ovn-controller (OVN scenarios)
]
# Debian's libreswan conflicts with strongSwan as a package, though not in a single file with the
# strongSwan packages above: its .deb is unpacked over the root filesystem (dpkg-deb -x) and its
# dependencies, read from the .deb, are installed as packages. pluto, whack and `ipsec` then sit
# at their compiled-in paths next to charon.
LIBRESWAN = "libreswan"
# Hardware driver trees a virtio-only VM never loads; leaving them out halves the image.
MODULE_EXCLUDES = ["sound", "drivers/gpu", "drivers/media", "drivers/infiniband", "drivers/net/wireless",
                   "drivers/net/ethernet", "drivers/scsi", "drivers/usb", "drivers/iio", "drivers/hwmon",
                   "drivers/staging", "drivers/bluetooth", "drivers/input", "drivers/hid", "drivers/isdn"]
# Loaded by the initramfs: enough to mount ext4 from virtio-blk.
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "ext4"]
GUEST_PYTHON = "3.11"
# bench/ files the overlay carries to /opt/ovs-ipsec/bench (guest/userspace_perf.py runs them).
BENCH_FILES = ("esp_bump.py", "esp_traffic.py")


@dataclass(frozen=True)
class Kernel:
    version: str          # uname -r, e.g. 6.1.0-56-amd64
    tree: Path            # the extracted package: boot/vmlinuz-*, lib/modules/*
    key: str

    @property
    def vmlinuz(self) -> Path:
        return self.tree / "boot" / f"vmlinuz-{self.version}"


@dataclass(frozen=True)
class Images:
    kernel: Kernel
    initramfs: Path
    base: Path            # ext4 image of the root filesystem (booted with snapshot=on)
    overlay: Path         # ext4 image mounted at /opt/ovs-ipsec


def build_all(force_base: bool = False) -> Images:
    kernel = build_kernel()
    return Images(kernel=kernel, initramfs=build_initramfs(kernel),
                  base=build_base(kernel, force=force_base), overlay=build_overlay(build_pydeps()))


# --- kernel ---------------------------------------------------------------------------------

def build_kernel() -> Kernel:
    """Debian's current linux-image-amd64 kernel, from the apt sources the host already uses."""
    deps = output(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(r"Depends: (linux-image-(\d\S*-amd64))", deps)
    if not m:
        raise LabError("apt knows no linux-image-amd64 kernel; run lab/setup.sh (it runs apt-get update)")
    pkg, version = m.group(1), m.group(2)
    candidate = _candidate(pkg)
    key = f"{pkg}_{candidate}"
    stage = paths.CACHE / "kernel"
    tree = stage / key
    if not (tree / "boot" / f"vmlinuz-{version}").exists():
        with Timer(f"download and unpack {pkg} {candidate}"):
            tmp = stage / f"{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            run(["apt-get", "download", f"{pkg}={candidate}"], cwd=tmp, capture_output=True)
            deb = next(tmp.glob("*.deb"))
            run(["dpkg-deb", "-x", deb, tmp / "tree"])
            # The initramfs step resolves module dependencies inside this tree.
            run(["depmod", "-b", tmp / "tree", version])
            deb.unlink()
            replace_dir(tmp / "tree", tree)
            shutil.rmtree(tmp)
        prune(stage, key)
    return Kernel(version=version, tree=tree, key=key)


# --- base root filesystem -------------------------------------------------------------------

def debian_mirror() -> str:
    """The Debian mirror apt on this host already uses (deb822 .sources first, then sources.list)."""
    uris = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                uris += fields.get("URIs", "").split()
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if f.exists():
            uris += re.findall(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", f.read_text(), re.M)
    if not uris:
        raise LabError(f"no apt source for Debian {SUITE} found in /etc/apt; cannot debootstrap")
    return uris[0]


def _candidate(package: str) -> str:
    m = re.search(r"Candidate: (\S+)", output(["apt-cache", "policy", package]))
    if not m or m.group(1) == "(none)":
        raise LabError(f"apt knows no {package} package; run lab/setup.sh (it runs apt-get update)")
    return m.group(1)


def _download_libreswan(folder: Path, version: str) -> tuple:
    """(the .deb, the names of the packages it depends on: first alternative, no versions)."""
    folder.mkdir(parents=True, exist_ok=True)
    run(["apt-get", "download", "-o", "APT::Sandbox::User=root", f"{LIBRESWAN}={version}"],
        cwd=folder, capture_output=True)
    deb = next(folder.glob(f"{LIBRESWAN}_*.deb"))
    depends = output(["dpkg-deb", "-f", deb, "Depends"])
    names = [dep.split("|")[0].split("(")[0].strip() for dep in depends.split(",")]
    return deb, [_real_package(n) for n in names if n]


def _real_package(name: str) -> str:
    """debootstrap installs only real packages: a virtual one (libreswan depends on `host`)
    becomes its first provider (bind9-host)."""
    if "Candidate: (none)" not in output(["apt-cache", "policy", name]):
        return name
    provides = output(["apt-cache", "showpkg", name]).split("Reverse Provides:", 1)[-1].split()
    if not provides:
        raise LabError(f"no package provides {name}, which {LIBRESWAN} depends on")
    return provides[0]


def build_base(kernel: Kernel, force: bool = False) -> Path:
    libreswan = _candidate(LIBRESWAN)
    key = digest(BASE_VERSION, SUITE, *BASE_PACKAGES, f"{LIBRESWAN}={libreswan}", kernel.key, *MODULE_EXCLUDES)
    stage = paths.CACHE / "base"
    final = stage / key
    image = final / "base.img"
    if image.exists() and not force:
        return image
    tmp = stage / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rootfs = tmp / "rootfs"
    rootfs.mkdir(parents=True)
    deb, libreswan_deps = _download_libreswan(tmp / "debs", libreswan)
    mirror = debian_mirror()
    with Timer(f"debootstrap {SUITE} from {mirror}"):
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES + libreswan_deps)}",
             SUITE, rootfs, mirror], capture_output=True, text=True)
    # --keep-directory-symlink: the .deb ships /lib/..., and /lib is a symlink (merged /usr).
    run(["bash", "-c", f"set -o pipefail; dpkg-deb --fsys-tarfile {deb} | tar -x --keep-directory-symlink -C {rootfs}"])
    shutil.rmtree(deb.parent)
    with Timer("install kernel modules"):
        _install_modules(kernel, rootfs)
    # Mount points for the overlay disk and the host's results share.
    (rootfs / "opt/ovs-ipsec").mkdir(parents=True, exist_ok=True)
    (rootfs / "results").mkdir(exist_ok=True)
    # Downloaded .debs and package lists are dead weight in the image.
    for junk in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        junk.unlink()
    shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
    with Timer("base ext4 image"):
        _mkfs(rootfs, tmp / "base.img", label="labroot", extra_mb=512)
    run(["rm", "-rf", rootfs])   # the image holds it all; keeping both doubles the cache
    replace_dir(tmp, final)
    prune(stage, key)
    return image


def _install_modules(kernel: Kernel, rootfs: Path) -> None:
    src = kernel.tree / "lib/modules" / kernel.version
    dst = rootfs / "usr/lib/modules" / kernel.version
    shutil.rmtree(dst, ignore_errors=True)
    skip = {src / "kernel" / e for e in MODULE_EXCLUDES}
    shutil.copytree(src, dst, symlinks=True,
                    ignore=lambda d, names: [n for n in names if Path(d) / n in skip])
    run(["depmod", "-b", rootfs, kernel.version])


def _mkfs(tree: Path, image: Path, label: str, extra_mb: int) -> None:
    """ext4 image filled from a directory tree with mkfs.ext4 -d (no mounting, no root loop devices)."""
    used_mb = int(output(["du", "-sm", tree]).split()[0])
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate((used_mb * 5 // 4 + extra_mb) * 1024 * 1024)
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", tree, image])


# --- initramfs ------------------------------------------------------------------------------

def build_initramfs(kernel: Kernel) -> Path:
    """Debian builds virtio_blk and ext4 as modules, so the kernel needs a tiny initramfs to mount /."""
    init = paths.GUEST / "initramfs-init"
    key = digest(kernel.key, init, *INITRAMFS_MODULES)
    stage = paths.CACHE / "initramfs"
    out = stage / f"{key}.cpio.gz"
    if out.exists():
        return out
    with Timer("initramfs"):
        tmp = stage / f"{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
            (tmp / d).mkdir(parents=True)
        busybox = shutil.which("busybox") or "/bin/busybox"
        shutil.copy2(busybox, tmp / "bin/busybox")
        shutil.copy2(init, tmp / "init")
        (tmp / "init").chmod(0o755)
        # modprobe --show-depends lists each module after its dependencies: that is the insmod order.
        order = []
        for mod in INITRAMFS_MODULES:
            deps = output(["modprobe", "-d", kernel.tree, "-S", kernel.version, "--show-depends", mod])
            for line in deps.splitlines():
                f = line.split()
                if f[0] == "insmod" and Path(f[1]).name not in order:
                    shutil.copy2(f[1], tmp / "lib/modules")
                    order.append(Path(f[1]).name)
        (tmp / "lib/modules/order").write_text("\n".join(order) + "\n")
        files = subprocess.run(["find", "."], cwd=tmp, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tmp, input=files,
                              capture_output=True, check=True).stdout
        gz = subprocess.run(["gzip", "-1"], input=cpio, capture_output=True, check=True).stdout
        out.with_suffix(".part").write_bytes(gz)
        out.with_suffix(".part").rename(out)
        shutil.rmtree(tmp)
    prune(stage, out.name)
    return out


# --- the project's Python dependencies ------------------------------------------------------

def _project_dependencies() -> list:
    return tomllib.loads((paths.REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def _host_python311() -> str:
    """A CPython 3.11 on the host, so pip picks wheels built for the VM's python3 (Debian's 3.11)."""
    for py in (paths.REPO / ".venv/bin/python", shutil.which("python3.11"), shutil.which("python3"), sys.executable):
        if py and Path(py).exists():
            ver = subprocess.run([py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
            if ver == GUEST_PYTHON:
                return str(py)
    raise LabError(f"need a Python {GUEST_PYTHON} on the host to install the VM's Python packages")


def build_pydeps() -> Path:
    """pip install --target on the host: the VM has no network, and its python3 is the same 3.11."""
    deps = _project_dependencies()
    key = digest(GUEST_PYTHON, *deps)
    stage = paths.CACHE / "pydeps"
    final = stage / key
    if final.is_dir():
        return final
    with Timer(f"pip install --target ({', '.join(deps)})"):
        tmp = stage / f"{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run([_host_python311(), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-warn-script-location", "--target", tmp, *deps], capture_output=True, text=True)
        replace_dir(tmp, final)
    prune(stage, key)
    return final


# --- the project overlay --------------------------------------------------------------------

def build_overlay(pydeps: Path) -> Path:
    """src/, the Python dependencies and the guest side of the lab, as a small ext4 image.

    Its key hashes every input file, so any edit of the project rebuilds it (a few seconds)
    while the base image stays cached.
    """
    src = paths.REPO / "src"
    # The userspace ESP throughput scenario runs the benchmark's bump and traffic generator.
    bench = [paths.REPO / "bench" / name for name in BENCH_FILES]
    key = digest(pydeps.name, src, paths.GUEST, paths.SCENARIOS, *bench)
    stage = paths.CACHE / "overlay"
    image = stage / f"{key}.img"
    if image.exists():
        return image
    with Timer("project overlay image"):
        tree = stage / f"{key}.tree"
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        shutil.copytree(src, tree / "src", ignore=ignore)
        shutil.copytree(pydeps, tree / "pydeps", symlinks=True)
        shutil.copytree(paths.GUEST, tree / "lab", ignore=ignore)
        shutil.copy2(paths.SCENARIOS, tree / "lab/scenarios.toml")
        (tree / "bench").mkdir()
        for path in bench:
            shutil.copy2(path, tree / "bench" / path.name)
        # Byte-compile on the host: importing cryptography and ovs from source under TCG is slow.
        subprocess.run([_host_python311(), "-m", "compileall", "-q", "-j", "0", tree / "src", tree / "lab",
                        tree / "bench"],
                       capture_output=True)
        _mkfs(tree, image.with_suffix(".part"), label="ovsipsec", extra_mb=32)
        image.with_suffix(".part").rename(image)
        shutil.rmtree(tree)
    prune(stage, image.name)
    return image
