"""Build the VM's pieces for one Debian release, each cached under CACHE/<distro>/<stage>/<key>
and rebuilt only when its key changes.

    apt/        a private apt configuration for the release (sources, lists)   refreshed daily
    kernel/     its linux-image-amd64 kernel package, extracted             key: package + version
    base/       debootstrap'ed release + LibreSwan + the kernel's modules   key: the Distro, packages,
                ext4 image                                                     libreswan, kernel
    initramfs/  busybox + the modules needed to mount the disks             key: kernel, guest/initramfs-init
    pydeps/     the project's Python dependencies, for the guest's python3  key: python, glibc, dependencies
    overlay/    src/ + pydeps + lab/guest + scenarios, ext4 image           key: content hash of all of those

A Distro (below) is the one description of a release: adding one is adding an entry to DISTROS.
The base image is the slow part (debootstrap, about a minute) and depends on nothing in the
project, so editing the project only rebuilds the overlay (a few seconds). The VM mounts the
overlay at /opt/ovs-ipsec.

The distribution is the cache's top folder (CACHE/debian12/base/..., not CACHE/base/debian12):
each stage keeps one entry per distribution (prune), and a lab of an older layout, which prunes
CACHE/base/ and the like, never deletes these.
"""

import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .util import LabError, Timer, digest, log, output, prune, replace_dir, run

# Packages of every base image (debootstrap --include); a Distro may add its own.
BASE_PACKAGES = (
    "openvswitch-switch",               # ovsdb-server, ovs-vswitchd, ovs-vsctl
    "strongswan-swanctl",
    "charon-systemd",                   # the IKE daemon the monitor drives over VICI
    "libstrongswan-standard-plugins",   # gcm, openssl (AES-GCM / ECP proposals)
    "iproute2", "tcpdump", "iputils-ping", "kmod", "procps",
    "python3",                          # Debian's python3, runs the monitor and the guest runner
    "ovn-central", "ovn-host",          # NB/SB ovsdb-servers, ovn-northd, ovn-controller (OVN scenarios)
    # Debian's upstream ovs-monitor-ipsec (/usr/share/openvswitch/scripts) for the mixed-cluster
    # scenarios (lab/guest/upstream.py), and openssl, which its LibreSwan mode runs (pkcs12).
    "openvswitch-ipsec", "openssl",
)
# strongSwan's starter (`ipsec`, stroke) and its charon: upstream's strongSwan mode drives charon
# through them. Debian 13's strongswan-charon conflicts with charon-systemd as a package (not in a
# file), and both releases' starter with libreswan: they are unpacked like LibreSwan, before it,
# and strongSwan's `ipsec` is kept as /usr/sbin/ipsec.strongswan (LibreSwan's takes /usr/sbin/ipsec).
STARTER_PACKAGES = ("strongswan-starter", "strongswan-charon")
STRONGSWAN_IPSEC = "usr/sbin/ipsec.strongswan"


@dataclass(frozen=True)
class Distro:
    """One Debian release the lab boots: everything the build needs to know about it.

    Every field is part of the base image's key, so changing one rebuilds that release's images.
    """

    name: str              # "debian12": lab/run.sh --distro, the cache folder, `distro` in the results
    suite: str             # "bookworm": what debootstrap installs; apt also reads <suite>-updates/-security
    python: str            # "3.11": the guest's python3 (Debian's); pydeps are installed for it
    glibc: str             # "2.36": manylinux wheels up to this glibc load in the guest
    packages: tuple = BASE_PACKAGES
    # The metapackage whose Depends names the current kernel package (linux-image-<uname -r>).
    kernel: str = "linux-image-amd64"
    # Debian's libreswan conflicts with strongSwan as a package (in both releases), though not in a
    # single file with the strongSwan packages above: its .deb is unpacked over the root filesystem
    # and its dependencies, read from the .deb, are installed as packages. pluto, whack and `ipsec`
    # then sit at their compiled-in paths next to charon.
    libreswan: str = "libreswan"
    # Bump when the build below changes in a way the fields do not show.
    revision: int = 1


DISTROS = {d.name: d for d in (
    # strongSwan 5.9.8, LibreSwan 4.10, OVS 3.1, OVN 23.03, kernel 6.1, python3 3.11
    Distro(name="debian12", suite="bookworm", python="3.11", glibc="2.36"),
    # strongSwan 6.0.1, LibreSwan 5.2, OVS 3.5, OVN 25.03, kernel 6.12, python3 3.13
    Distro(name="debian13", suite="trixie", python="3.13", glibc="2.41"),
)}
DEFAULT_DISTRO = "debian12"

# Hardware driver trees a virtio-only VM never loads; leaving them out halves the image.
MODULE_EXCLUDES = ["sound", "drivers/gpu", "drivers/media", "drivers/infiniband", "drivers/net/wireless",
                   "drivers/net/ethernet", "drivers/scsi", "drivers/usb", "drivers/iio", "drivers/hwmon",
                   "drivers/staging", "drivers/bluetooth", "drivers/input", "drivers/hid", "drivers/isdn"]
# Loaded by the initramfs: enough to mount ext4 from virtio-blk.
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "ext4"]
# bench/ files the overlay carries to /opt/ovs-ipsec/bench (guest/userspace_perf.py runs them).
BENCH_FILES = ("esp_bump.py", "esp_traffic.py")
# The private apt lists are refreshed when older than this (the kernel and LibreSwan candidates,
# hence the base image, follow the mirror at most this late).
APT_LISTS_MAX_AGE = 24 * 3600


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
    distro: Distro
    kernel: Kernel
    initramfs: Path
    base: Path            # ext4 image of the root filesystem (booted with snapshot=on)
    overlay: Path         # ext4 image mounted at /opt/ovs-ipsec


def build_all(distro: Distro, force_base: bool = False) -> Images:
    apt = Apt(distro)
    kernel = build_kernel(distro, apt)
    return Images(distro=distro, kernel=kernel, initramfs=build_initramfs(distro, kernel),
                  base=build_base(distro, apt, kernel, force=force_base),
                  overlay=build_overlay(distro, build_pydeps(distro)))


def _stage(distro: Distro, name: str) -> Path:
    return paths.CACHE / distro.name / name


# --- apt: the release's packages, without touching the host's apt -----------------------------

def host_mirrors() -> dict:
    """{"archive": URI, "security": URI} of the Debian mirror the host's apt already uses: the
    entries for the host's own release (deb822 .sources first, then sources.list). The lab reads
    every release it builds from the same mirror."""
    release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', Path("/etc/os-release").read_text(), re.M))
    codename = release.get("VERSION_CODENAME", "bookworm")
    entries = []   # (uris, suites)
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split():
                entries.append((fields.get("URIs", "").split(), fields.get("Suites", "").split()))
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if f.exists():
            for uri, suite in re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s", f.read_text(), re.M):
                entries.append(([uri], [suite]))
    mirrors = {}
    for uris, suites in entries:
        if uris and codename in suites:
            mirrors.setdefault("archive", uris[0])
        if uris and f"{codename}-security" in suites:
            mirrors.setdefault("security", uris[0])
    if "archive" not in mirrors:
        raise LabError(f"no apt source for Debian {codename} found in /etc/apt; cannot debootstrap")
    return mirrors


class Apt:
    """apt-get/apt-cache with a private configuration for one release: its own sources.list (the
    host's mirror, this release's suites), lists and downloads under CACHE/<distro>/apt. The host's
    apt is neither changed nor needs to know the release (a Debian 12 host builds Debian 13)."""

    KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

    def __init__(self, distro: Distro):
        self.distro, self.root = distro, _stage(distro, "apt")
        self.mirrors = host_mirrors()
        self.mirror = self.mirrors["archive"]
        self._fresh = False

    def sources(self) -> str:
        lines = [f"deb [signed-by={self.KEYRING}] {self.mirror} {s} main"
                 for s in (self.distro.suite, f"{self.distro.suite}-updates")]
        if "security" in self.mirrors:
            lines.append(f"deb [signed-by={self.KEYRING}] {self.mirrors['security']} "
                         f"{self.distro.suite}-security main")
        return "\n".join(lines) + "\n"

    def _options(self) -> list:
        r = self.root
        return ["-o", f"Dir::Etc::SourceList={r}/sources.list", "-o", f"Dir::Etc::SourceParts={r}/empty",
                "-o", f"Dir::Etc::Preferences={r}/empty/none", "-o", f"Dir::Etc::PreferencesParts={r}/empty",
                "-o", f"Dir::State={r}/state", "-o", f"Dir::State::status={r}/status",
                "-o", f"Dir::Cache={r}/cache", "-o", "APT::Sandbox::User=root",
                "-o", "Acquire::Languages=none"]

    def _update_if_stale(self) -> None:
        if self._fresh:
            return
        r = self.root
        for d in (r / "empty", r / "state/lists/partial", r / "cache/archives/partial"):
            d.mkdir(parents=True, exist_ok=True)
        (r / "status").touch()
        sources = self.sources()
        stamp = r / "state/updated"
        stale = (not stamp.exists() or stamp.read_text() != sources
                 or time.time() - stamp.stat().st_mtime > APT_LISTS_MAX_AGE)
        if stale:
            (r / "sources.list").write_text(sources)
            with Timer(f"apt-get update ({self.distro.suite} from {self.mirror})"):
                run(["apt-get", *self._options(), "-q", "update"], capture_output=True, text=True)
            stamp.write_text(sources)
        self._fresh = True

    def cache(self, *args) -> str:
        self._update_if_stale()
        return output(["apt-cache", *self._options(), *args])

    def download(self, spec: str, folder: Path) -> Path:
        """One .deb (`name=version`) into `folder`."""
        self._update_if_stale()
        folder.mkdir(parents=True, exist_ok=True)
        run(["apt-get", *self._options(), "download", spec], cwd=folder, capture_output=True, text=True)
        return next(folder.glob(f"{spec.split('=')[0]}_*.deb"))

    def candidate(self, package: str) -> str:
        m = re.search(r"Candidate: (\S+)", self.cache("policy", package))
        if not m or m.group(1) == "(none)":
            raise LabError(f"apt knows no {package} package in Debian {self.distro.suite}")
        return m.group(1)

    def real_package(self, name: str) -> str:
        """debootstrap installs only real packages: a virtual one (libreswan depends on `host`)
        becomes its first provider (bind9-host)."""
        if "Candidate: (none)" not in self.cache("policy", name):
            return name
        provides = self.cache("showpkg", name).split("Reverse Provides:", 1)[-1].split()
        if not provides:
            raise LabError(f"no package provides {name} in Debian {self.distro.suite}")
        return provides[0]


# --- kernel ---------------------------------------------------------------------------------

def build_kernel(distro: Distro, apt: Apt) -> Kernel:
    """The release's current linux-image-amd64 kernel."""
    deps = apt.cache("depends", distro.kernel)
    m = re.search(r"Depends: (linux-image-(\d\S*-amd64))\b(?!-)", deps)
    if not m:
        raise LabError(f"apt knows no {distro.kernel} kernel in Debian {distro.suite}")
    pkg, version = m.group(1), m.group(2)
    candidate = apt.candidate(pkg)
    key = f"{pkg}_{candidate}"
    stage = _stage(distro, "kernel")
    tree = stage / key
    if not (tree / "boot" / f"vmlinuz-{version}").exists():
        with Timer(f"download and unpack {pkg} {candidate}"):
            tmp = stage / f"{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            deb = apt.download(f"{pkg}={candidate}", tmp)
            run(["dpkg-deb", "-x", deb, tmp / "tree"])
            # Debian 13's kernel ships its modules in /usr/lib/modules (merged /usr), Debian 12's
            # in /lib/modules; the host's depmod and modprobe -d look in <tree>/lib/modules.
            moved = tmp / "tree/usr/lib/modules"
            if moved.is_dir() and not (tmp / "tree/lib/modules").exists():
                (tmp / "tree/lib").mkdir(exist_ok=True)
                moved.rename(tmp / "tree/lib/modules")
            # The initramfs step resolves module dependencies inside this tree.
            run(["depmod", "-b", tmp / "tree", version])
            deb.unlink()
            replace_dir(tmp / "tree", tree)
            shutil.rmtree(tmp)
        prune(stage, key)
    return Kernel(version=version, tree=tree, key=key)


# --- base root filesystem -------------------------------------------------------------------

def _download_libreswan(apt: Apt, folder: Path, version: str) -> tuple:
    """(the .deb, the names of the packages it depends on: first alternative, no versions)."""
    deb = apt.download(f"{apt.distro.libreswan}={version}", folder)
    depends = output(["dpkg-deb", "-f", deb, "Depends"])
    names = [dep.split("|")[0].split("(")[0].strip() for dep in depends.split(",")]
    return deb, [apt.real_package(n) for n in names if n]


def build_base(distro: Distro, apt: Apt, kernel: Kernel, force: bool = False) -> Path:
    libreswan = apt.candidate(distro.libreswan)
    starter = [f"{p}={apt.candidate(p)}" for p in STARTER_PACKAGES]
    key = digest(distro, f"{distro.libreswan}={libreswan}", kernel.key, *MODULE_EXCLUDES, *starter)
    stage = _stage(distro, "base")
    final = stage / key
    image = final / "base.img"
    if image.exists() and not force:
        return image
    tmp = stage / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rootfs = tmp / "rootfs"
    rootfs.mkdir(parents=True)
    deb, libreswan_deps = _download_libreswan(apt, tmp / "debs", libreswan)
    starter_debs = [apt.download(spec, tmp / "debs") for spec in starter]
    with Timer(f"debootstrap {distro.suite} from {apt.mirror}"):
        run(["debootstrap", "--variant=minbase", f"--include={','.join(distro.packages + tuple(libreswan_deps))}",
             distro.suite, rootfs, apt.mirror], capture_output=True, text=True)
    for unpacked in starter_debs:
        _unpack(unpacked, rootfs)
    shutil.copy2(rootfs / "usr/sbin/ipsec", rootfs / STRONGSWAN_IPSEC)
    _unpack(deb, rootfs)
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


def _unpack(deb: Path, rootfs: Path) -> None:
    """A .deb's files over the root, without dpkg (see STARTER_PACKAGES and Distro.libreswan)."""
    # --keep-directory-symlink: the .deb may ship /lib/..., and /lib is a symlink (merged /usr).
    run(["bash", "-c", f"set -o pipefail; dpkg-deb --fsys-tarfile {deb} | tar -x --keep-directory-symlink -C {rootfs}"])


def _install_modules(kernel: Kernel, rootfs: Path) -> None:
    src = kernel.tree / "lib/modules" / kernel.version
    # usr/lib/modules: both releases have merged /usr (/lib -> usr/lib).
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

def build_initramfs(distro: Distro, kernel: Kernel) -> Path:
    """Debian builds virtio_blk and ext4 as modules, so the kernel needs a tiny initramfs to mount /."""
    init = paths.GUEST / "initramfs-init"
    key = digest(kernel.key, init, *INITRAMFS_MODULES)
    stage = _stage(distro, "initramfs")
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
                if f[0] != "insmod":
                    continue
                name = Path(f[1]).name
                # Debian 13 compresses its modules (.ko.xz); busybox insmod is given plain .ko files.
                plain = name.removesuffix(".xz")
                if plain in order:
                    continue
                if name.endswith(".xz"):
                    (tmp / "lib/modules" / plain).write_bytes(
                        subprocess.run(["xz", "-dc", f[1]], capture_output=True, check=True).stdout)
                else:
                    shutil.copy2(f[1], tmp / "lib/modules")
                order.append(plain)
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


def _python_version(py) -> str:
    return subprocess.run([py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True).stdout.strip()


def _host_pip_python() -> str:
    """A host Python with pip (any version): it installs for the guest's version, not its own."""
    for py in (paths.REPO / ".venv/bin/python", sys.executable, shutil.which("python3")):
        if py and Path(py).exists() and subprocess.run([py, "-m", "pip", "--version"],
                                                       capture_output=True).returncode == 0:
            return str(py)
    raise LabError("need a Python with pip on the host to install the VM's Python packages (make setup)")


def _host_python(version: str):
    """A host CPython of exactly `version` (to byte-compile for the guest), or None."""
    for py in (paths.REPO / ".venv/bin/python", shutil.which(f"python{version}"), shutil.which("python3"),
               sys.executable):
        if py and Path(py).exists() and _python_version(py) == version:
            return str(py)
    return None


def _manylinux_platforms(glibc: str) -> list:
    """pip --platform tags for every manylinux wheel a guest with this glibc can load."""
    newest = int(glibc.split(".")[1])
    return ["manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, newest + 1))]


def build_pydeps(distro: Distro) -> Path:
    """The dependencies for the guest's python3, installed on the host (the VM has no network).

    The host's Python need not be the guest's: pip installs wheels for the guest's version, ABI
    and glibc (`--python-version --abi --platform --only-binary=:all:`), which is how a Debian 12
    host fills a Debian 13 guest running Python 3.13. python-ovs is published as a source
    distribution only; it is built into a wheel first, a pure-Python one (its optional C JSON
    parser needs OVS's headers and library, which the host lacks, and the lab's OVSDBs are tiny).
    """
    deps = _project_dependencies()
    key = digest(distro.python, distro.glibc, *deps)
    stage = _stage(distro, "pydeps")
    final = stage / key
    if final.is_dir():
        return final
    py = _host_pip_python()
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    abi = f"cp{distro.python.replace('.', '')}"
    with Timer(f"pip install for Python {distro.python} ({', '.join(deps)})"):
        tmp = stage / f"{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # Wheels of the direct dependencies that have none on the index (python-ovs); the others
        # are only downloaded here, and the install below picks the guest's from the index.
        run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp / "wheels", *deps],
            capture_output=True, text=True)
        platforms = [arg for p in _manylinux_platforms(distro.glibc) for arg in ("--platform", p)]
        run([*pip, "install", "--quiet", "--no-warn-script-location", "--no-compile",
             "--target", tmp / "site", "--only-binary=:all:", "--find-links", tmp / "wheels",
             "--implementation", "cp", "--python-version", distro.python,
             "--abi", abi, "--abi", "abi3", "--abi", "none", *platforms, *deps],
            capture_output=True, text=True)
        replace_dir(tmp / "site", final)
        shutil.rmtree(tmp)
    prune(stage, key)
    return final


# --- the project overlay --------------------------------------------------------------------

GOLDEN_CONFS = paths.REPO / "tests/unit/golden"

def build_overlay(distro: Distro, pydeps: Path) -> Path:
    """src/, the Python dependencies and the guest side of the lab, as a small ext4 image.

    Its key hashes every input file, so any edit of the project rebuilds it (a few seconds)
    while the base image stays cached.
    """
    src = paths.REPO / "src"
    # The userspace ESP throughput scenario runs the benchmark's bump and traffic generator.
    bench = [paths.REPO / "bench" / name for name in BENCH_FILES]
    key = digest(distro.python, pydeps.name, src, paths.GUEST, paths.SCENARIOS, paths.REPO / "testsupport",
                 *bench, *sorted(GOLDEN_CONFS.glob("libreswan*.conf")))
    stage = _stage(distro, "overlay")
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
        shutil.copytree(paths.REPO / "testsupport", tree / "testsupport", ignore=ignore)
        shutil.copy2(paths.SCENARIOS, tree / "lab/scenarios.toml")
        (tree / "bench").mkdir()
        for path in bench:
            shutil.copy2(path, tree / "bench" / path.name)
        # The renderer's golden files, for `lab/run.sh --golden` (guest/golden.py loads them into pluto).
        (tree / "golden-conf").mkdir()
        for conf in sorted(GOLDEN_CONFS.glob("libreswan*.conf")):
            shutil.copy2(conf, tree / "golden-conf")
        # Byte-compile on the host when it has the guest's Python: importing cryptography and ovs
        # from source under TCG is slow. Otherwise (a Debian 12 host, a Debian 13 guest) the guest
        # compiles each module on its first import into the overlay, which it mounts writable
        # (QEMU's snapshot=on keeps those writes out of this cached image): once per boot.
        py = _host_python(distro.python)
        if py:
            subprocess.run([py, "-m", "compileall", "-q", "-j", "0", tree / "src", tree / "lab", tree / "testsupport", tree / "bench",
                            tree / "pydeps"],
                           capture_output=True)
        else:
            log(f"no Python {distro.python} on the host: the guest byte-compiles on first import")
        _mkfs(tree, image.with_suffix(".part"), label="ovsipsec", extra_mb=32)
        image.with_suffix(".part").rename(image)
        shutil.rmtree(tree)
    prune(stage, image.name)
    return image
