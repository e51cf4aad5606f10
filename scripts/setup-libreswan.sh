#!/usr/bin/env bash
# LibreSwan for the tests, without installing it: Debian's libreswan package conflicts with
# strongSwan (which the project also needs), so its .deb is downloaded and extracted into a cache
# folder, and its runtime dependencies (none of which conflict) are installed as usual. The
# sandbox runs pluto from there in a private mount namespace (see testsupport/pluto.py).
# Idempotent: quick when everything is in place. LIBRESWAN_ROOT overrides the cache folder.
set -euo pipefail

CACHE=${LIBRESWAN_ROOT:-/var/cache/ovs-ipsec/libreswan}
DEPS=(
  libnss3-tools libnss3 libnspr4 libcap-ng0 libcurl3-nss libevent-core-2.1-7 libevent-pthreads-2.1-7
  libldns3 libunbound8 libaudit1 libldap-2.5-0 libpam0g libselinux1 libcrypt1 libsystemd0
  iproute2 iptables dns-root-data bind9-host
)

if [ -x "$CACHE/root/usr/libexec/ipsec/pluto" ] && [ -x "$CACHE/root/usr/libexec/ipsec/whack" ] \
    && command -v certutil >/dev/null && command -v pk12util >/dev/null; then
  exit 0
fi

missing=()
for package in "${DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
export DEBIAN_FRONTEND=noninteractive
updated=no
if ((${#missing[@]})); then
  echo "setup-libreswan: installing ${missing[*]}"
  apt-get update -q
  updated=yes
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

mkdir -p "$CACHE"
cd "$CACHE"
deb=$(ls libreswan_*.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  echo "setup-libreswan: downloading the libreswan package into $CACHE"
  [ "$updated" = yes ] || apt-get update -q
  apt-get download -q -o APT::Sandbox::User=root libreswan
  deb=$(ls libreswan_*.deb | head -n 1)
fi
rm -rf root.tmp
dpkg-deb -x "$deb" root.tmp
rm -rf root
mv root.tmp root
echo "setup-libreswan: $("$CACHE/root/usr/libexec/ipsec/pluto" --version 2>&1 | head -n 1) in $CACHE/root"
