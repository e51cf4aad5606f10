#!/bin/bash
# Install the host packages the real-kernel lab needs. Idempotent: installs only what is
# missing and refreshes apt's package lists only when something has to be installed. (The
# kernels, LibreSwan and the base images come from the image build's own apt configuration
# per distribution, labhost/image.py Apt, not from the host's apt.)
set -euo pipefail

HOST_PACKAGES=(
  qemu-system-x86   # qemu-system-x86_64 (TCG; KVM does not work on the CI host)
  qemu-utils        # qemu-img, for the copy-on-write overlay of -snapshot
  debootstrap       # builds the Debian 12 and Debian 13 root filesystems
  busybox-static    # the initramfs userland
  cpio              # packs the initramfs
  e2fsprogs         # mkfs.ext4 -d builds disk images without mounting
  kmod              # modprobe --show-depends / depmod for the Debian kernel's modules
  xz-utils          # Debian 13's kernel modules are .ko.xz; the initramfs gets them decompressed
)

APT=(apt-get -o DPkg::Lock::Timeout=900 -y --no-install-recommends)
export DEBIAN_FRONTEND=noninteractive

missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=900 update -q
  echo "lab/setup.sh: installing ${missing[*]}"
  "${APT[@]}" install "${missing[@]}"
fi
