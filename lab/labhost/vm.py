"""Boot the lab VM under QEMU TCG and stream its serial console.

KVM is not usable on the CI host (nested PVM), so the VM runs under TCG; `-cpu max` still gives
the guest AES-NI, and Debian's kernel boots to userspace in about 8 s. The VM has no NIC: all
traffic stays inside it. Disks are attached with snapshot=on, so nothing the guest writes
reaches the cached images; results come back through a writable 9p share of lab/results/.
"""

import subprocess
import threading
import time
from pathlib import Path

from .image import Images
from .util import log

# Lines the guest prints for the operator; everything else only goes to console.log.
PROGRESS_PREFIXES = ("LAB", "[initramfs]", "Kernel panic")


def boot(images: Images, results: Path, kernel_args: list, timeout: float, interactive: bool = False) -> int:
    """Boot, wait for the guest to power off (or for `timeout` seconds), return QEMU's exit status."""
    append = ["console=ttyS0", "panic=-1", "quiet", "root=/dev/vda", "overlay=/dev/vdb",
              "init=/opt/ovs-ipsec/lab/init.sh", *kernel_args]
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048",
        "-display", "none", "-no-reboot", "-nic", "none",
        "-kernel", images.kernel.vmlinuz, "-initrd", images.initramfs,
        "-drive", f"file={images.base},format=raw,if=virtio,snapshot=on",
        "-drive", f"file={images.overlay},format=raw,if=virtio,snapshot=on",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none,id=results",
        "-append", " ".join(append),
    ]
    if interactive:
        argv += ["-serial", "mon:stdio"]
        return subprocess.run([str(a) for a in argv]).returncode
    argv += ["-serial", "stdio", "-monitor", "none"]

    console = results / "console.log"
    t0 = time.monotonic()
    with open(console, "w", errors="replace") as out:
        proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        killer = threading.Timer(timeout, _kill, (proc, timeout))
        killer.start()
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                text = line.rstrip("\r\n")
                if text.startswith(PROGRESS_PREFIXES):
                    print(f"  [vm {time.monotonic() - t0:6.1f}s] {text}", flush=True)
            return proc.wait()
        finally:
            killer.cancel()
            if proc.poll() is None:
                _kill(proc, None)


def _kill(proc: subprocess.Popen, timeout) -> None:
    if timeout is not None:
        log(f"VM still running after {timeout:.0f}s: stopping QEMU (pid {proc.pid})")
    proc.kill()    # only the QEMU process this driver started
