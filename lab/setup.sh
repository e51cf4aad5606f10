#!/bin/bash
# Install the host packages the real-kernel lab needs. Idempotent: installs only what is
# missing and refreshes apt's package lists only when something has to be installed (or
# when apt has no candidate for the lab kernel, which the image build downloads with apt).
set -euo pipefail

HOST_PACKAGES=(
  qemu-system-x86   # qemu-system-x86_64 (TCG; KVM does not work on the CI host)
  qemu-utils        # qemu-img, for the copy-on-write overlay of -snapshot
  debootstrap       # builds the Debian 12 root filesystem
  busybox-static    # the initramfs userland
  cpio              # packs the initramfs
  e2fsprogs         # mkfs.ext4 -d builds disk images without mounting
  kmod              # modprobe --show-depends / depmod for the Debian kernel's modules
)

APT=(apt-get -o DPkg::Lock::Timeout=900 -y --no-install-recommends)
export DEBIAN_FRONTEND=noninteractive

missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# The image build downloads linux-image-amd64's current kernel package with apt-get download.
kernel_known() { apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-[0-9]'; }

if [ ${#missing[@]} -gt 0 ] || ! kernel_known; then
  apt-get -o DPkg::Lock::Timeout=900 update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "lab/setup.sh: installing ${missing[*]}"
  "${APT[@]}" install "${missing[@]}"
fi
