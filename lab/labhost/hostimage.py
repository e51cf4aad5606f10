"""The systemd lab's root disk: Debian hosts that boot systemd as PID 1 (issue #15).

A stage of its own next to image.py's (which it only calls for the kernel's modules and the ext4
helper), cached like them under CACHE/<stage>/<key> (the key names the suite):

    hosttree/   debootstrap'ed Debian 12 with systemd, systemd-nspawn, Open vSwitch and Debian's
                openvswitch-ipsec (upstream's ovs-monitor-ipsec with strongswan-starter's charon),
                plus the .debs of charon-systemd and strongswan-swanctl, downloaded, not installed
                                                         key: HOST_VERSION, packages, kernel
    hostimage/  that tree as the VM's root, with two machine trees under /srv/machines:
                  upstream/   the tree as it is: a stock openvswitch-ipsec host; ours and its new
                              dependencies wait in /root/debs for the operator's `apt install`
                  ovs-ipsec/  a stock host where the operator ran `apt install ./ovs-ipsec_*.deb`
                              (openvswitch-ipsec never installed)
                and the kernel's modules; an ext4 image
                                                         key: hosttree key + the .deb's content

The VM's own init (lab/guest/init.sh) stays PID 1 of the VM; each lab host is a systemd-nspawn
machine booting systemd as *its* PID 1, in its own network namespace, over an overlay of one of
the machine trees (lab/guest/machines.py). Editing the project rebuilds the .deb and hostimage
(about a minute), never the debootstrap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from . import image, paths
from .util import LabError, Timer, digest, output, prune, replace_dir, run

HOST_VERSION = 1
HOST_PACKAGES = [
    "systemd", "systemd-sysv", "systemd-container",   # PID 1 of each host; nspawn in the VM
    "dbus",                                           # systemd-container needs a system bus
    "openvswitch-switch",                             # ovsdb-server, ovs-vswitchd units
    "openvswitch-ipsec",                              # upstream: ovs-monitor-ipsec + strongswan (starter)
    "openvswitch-pki",                                # ovs-pki, as upstream's tutorial makes certificates
    "libstrongswan-standard-plugins",                 # gcm, openssl: upstream's aes256gcm16 proposals
    "python3", "iproute2", "tcpdump", "iputils-ping", "procps", "kmod", "logrotate", "cron",
]
# Installed by the operator along with ours (its Depends), so not in the stock upstream host.
STAGED_DEBS = ["charon-systemd", "strongswan-swanctl"]
MACHINES = Path("srv/machines")
# The distributions whose hosts the lab builds: the package is proven on Debian 12 first (Debian 13
# runs the network-namespace scenarios; its systemd hosts are a follow-up).
DISTROS = ("debian12",)


def build_host_image(distro: image.Distro, kernel: image.Kernel, deb: Path) -> Path:
    tree = build_host_tree(distro, kernel)
    key = digest(tree.name, deb.read_bytes())
    stage = paths.CACHE / "hostimage"
    img = stage / key / "host.img"
    if img.exists():
        return img
    tmp = stage / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = tmp / "rootfs"
    with Timer("host image: VM root and machine trees"):
        run(["cp", "-al", tree / "rootfs", root])   # hard links: one copy of each file in the image
        machines = root / MACHINES
        machines.mkdir(parents=True)
        staged = _download_staged(image.Apt(distro), tree / "rootfs", tmp / "debs")
        run(["cp", "-al", tree / "rootfs", machines / "upstream"])
        _stage(machines / "upstream", [deb, *staged])
        _make_ovs_ipsec_machine(tree / "rootfs", machines / "ovs-ipsec", deb, staged)
        image._install_modules(kernel, root)
        (root / "opt/ovs-ipsec").mkdir(parents=True, exist_ok=True)
        (root / "results").mkdir(exist_ok=True)
        image._mkfs(root, tmp / "host.img", label="labhost", extra_mb=768)
        run(["rm", "-rf", root])
    replace_dir(tmp, stage / key)
    prune(stage, key)
    return img


def build_host_tree(distro: image.Distro, kernel: image.Kernel) -> Path:
    key = digest(HOST_VERSION, distro.suite, *HOST_PACKAGES, *STAGED_DEBS, kernel.key)
    stage = paths.CACHE / "hosttree"
    final = stage / key
    if (final / "rootfs/etc/os-release").exists():
        return final
    tmp = stage / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rootfs = tmp / "rootfs"
    rootfs.mkdir(parents=True)
    mirror = image.host_mirrors()["archive"]
    with Timer(f"debootstrap {distro.suite} with systemd and openvswitch-ipsec from {mirror}"):
        run(["debootstrap", "--variant=minbase", f"--include={','.join(HOST_PACKAGES)}",
             distro.suite, rootfs, mirror], capture_output=True, text=True)
    _configure(rootfs)
    for junk in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        junk.unlink()
    replace_dir(tmp, final)
    prune(stage, key)
    return final


def _configure(rootfs: Path) -> None:
    """What a freshly installed host has that debootstrap does not give: a root login on the
    console (for `machinectl login`-less debugging), a machine id on first boot, no getty noise."""
    (rootfs / "etc/hostname").write_text("lab-host\n")
    (rootfs / "etc/machine-id").write_text("")   # systemd makes one at first boot
    (rootfs / "etc/fstab").write_text("# lab host: the root is set up by systemd-nspawn\n")
    # Units a container has no use for and that only slow TCG boots down.
    for unit in ("systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                 "e2scrub_all.timer", "fstrim.timer", "man-db.timer"):
        link = rootfs / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def _download_staged(apt: image.Apt, tree: Path, folder: Path) -> list[Path]:
    """charon-systemd and strongswan-swanctl at the version of the strongSwan in the tree
    (debootstrap takes the suite's; the host's apt may prefer a newer point release from
    bookworm-security, whose packages would not fit the tree's libstrongswan)."""
    version = output(["chroot", tree, "dpkg-query", "-W", "-f=${Version}", "libstrongswan"]).strip()
    folder.mkdir(parents=True, exist_ok=True)
    return [apt.download(f"{name}={version}", folder) for name in STAGED_DEBS]


def _stage(machine: Path, debs: list[Path]) -> None:
    """What the operator copied to the host: /root/debs (a folder of its own in the linked copy).
    The hosts have no network but the lab's wire: apt knows only these .debs (with the mirror's
    lists, `apt install ./x.deb` fetches a package of the same version from the mirror instead)."""
    for lists in (machine / "var/lib/apt/lists").glob("*_Packages"):
        lists.unlink()   # a link of its own in the linked copy: the cached tree keeps its lists
    folder = machine / "root/debs"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for deb in debs:
        shutil.copy2(deb, folder / deb.name)


def _make_ovs_ipsec_machine(tree: Path, target: Path, deb: Path, staged: list[Path]) -> None:
    """A stock Debian 12 + Open vSwitch host where the operator installed our package with apt."""
    run(["cp", "-al", tree, target])   # dpkg replaces files by rename: the links split where it writes
    _stage(target, [deb, *staged])
    # Never had openvswitch-ipsec (nor its strongswan-starter).
    _chroot(target, "apt-get", "purge", "-y", "-q", "openvswitch-ipsec", "strongswan", "strongswan-starter",
            "strongswan-charon")
    _chroot(target, "apt-get", "install", "-y", "-q", "--no-install-recommends",
            *(f"/root/debs/{d.name}" for d in [deb, *staged]))
    _chroot(target, "apt-get", "autoremove", "-y", "-q")
    state = output(["chroot", target, "systemctl", "is-enabled", "ovs-ipsec.service", "ovs-ipsec-guard.service",
                    "strongswan.service"]).split()
    if state != ["enabled"] * 3:
        raise LabError(f"after apt install, ovs-ipsec/guard/strongswan units are {state}, not enabled")


def _chroot(root: Path, *argv: str) -> None:
    """A command in the tree, with the mounts dpkg and apt expect and no service started."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    mounts = []
    try:
        for fs, where in (("proc", "proc"), ("sysfs", "sys")):
            run(["mount", "-t", fs, fs, root / where])
            mounts.append(root / where)
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        done = subprocess.run(["chroot", str(root), *argv], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise LabError(f"chroot {root.name} {' '.join(argv)} exited {done.returncode}:\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    finally:
        for mount in reversed(mounts):
            run(["umount", "-l", mount], check=False)
        policy.unlink(missing_ok=True)


def build_deb() -> Path:
    """`make deb`'s package, built from this tree (scripts/build-deb.sh prints its path)."""
    with Timer("make deb"):
        done = subprocess.run([str(paths.REPO / "scripts/build-deb.sh")], cwd=paths.REPO, capture_output=True,
                              text=True, env={**os.environ})
    if done.returncode != 0:
        raise LabError(f"scripts/build-deb.sh failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return (paths.REPO / done.stdout.strip().splitlines()[-1]).resolve()
