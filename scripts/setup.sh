#!/usr/bin/env bash
# Install everything ovs-ipsec needs on a fresh Debian 12 machine; idempotent and quick when done.
#   Debian packages: Open vSwitch (ovsdb-server, ovs-vsctl, ovs-pki), strongSwan (charon-systemd
#   with VICI, swanctl), OVN, and the tools the tests use (tcpdump, iproute2, ping, openssl).
#   A virtualenv at .venv/ with the project (editable) and its PyPI dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  openvswitch-switch openvswitch-common openvswitch-pki openvswitch-ipsec python3-openvswitch
  strongswan-swanctl charon-systemd libstrongswan-standard-plugins libstrongswan-extra-plugins
  libcharon-extra-plugins strongswan-pki
  ovn-central ovn-host
  tcpdump iproute2 iputils-ping openssl python3 python3-venv python3-pip
  debhelper dpkg-dev fakeroot   # make deb (tests/packaging), the systemd-host lab
)

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Debian's packages would start system-wide daemons; tests run their own private ones.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# LibreSwan conflicts with strongSwan as a Debian package: its .deb is extracted for the tests.
scripts/setup-libreswan.sh

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.ovs-ipsec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,bench]'
  touch "$stamp"
fi

# The test support package (testsupport/, at the repository root, never in the wheel) is importable
# from this virtualenv: by the tests, the demos and the benchmark.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/ovs_ipsec_testsupport.pth"

# python-ovs from PyPI has no compiled JSON parser (Debian 12 ships no headers to build it), and
# parsing a large OVSDB update in pure Python is 30-40x slower. Debian's python3-openvswitch has
# the same extension for Python 3.11: use it when the virtualenv runs 3.11 and it parses correctly.
json_so=$(ls /usr/lib/python3/dist-packages/ovs/_json.cpython-311-*.so 2>/dev/null | head -n 1 || true)
if [ -n "$json_so" ] && ! .venv/bin/python -c 'import ovs._json' 2>/dev/null \
    && .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  target=$(.venv/bin/python -c 'import ovs, os; print(os.path.dirname(ovs.__file__))')
  cp "$json_so" "$target/"
  .venv/bin/python -c 'import ovs.json; assert ovs.json.from_string("{\"a\": [1, null]}") == {"a": [1, None]}' \
    || rm -f "$target/$(basename "$json_so")"
fi
