#!/usr/bin/env bash
# `make deb`: the Debian package, built with Debian's tools (dpkg-buildpackage, debhelper) from a
# copy of this tree under build/deb/, so nothing is written next to the checkout.
#   out: build/deb/ovs-ipsec_<version>_amd64.deb (its path is printed last)
# The pinned wheels of packaging/deb-requirements.txt are downloaded first (pip, PyPI, checked
# against their hashes); the package build itself runs offline.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for package in debhelper dpkg-dev fakeroot python3-pip; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
version=$(dpkg-parsechangelog -S Version)
python_version=$(python3 -c 'import ovs_ipsec' 2>/dev/null; PYTHONPATH=src python3 -c 'import ovs_ipsec; print(ovs_ipsec.__version__)')
if [ "$version" != "$python_version" ]; then
  echo "build-deb: debian/changelog says $version, src/ovs_ipsec says $python_version" >&2
  exit 1
fi
out=build/deb
work=$out/ovs-ipsec-$version
rm -rf "$out"
mkdir -p "$work"
# What the package is built from: tracked files only (no .venv, caches or results).
git ls-files -z --cached --others --exclude-standard -- debian packaging src LICENSE README.md pyproject.toml \
  | xargs -0 cp --parents -t "$work"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 \
  --require-hashes -r packaging/deb-requirements.txt -d "$work/wheels"
(cd "$work" && dpkg-buildpackage -us -uc -b --no-sign >../build.log 2>&1) || { tail -40 "$out/build.log" >&2; exit 1; }
deb=$(ls "$out"/ovs-ipsec_"$version"_*.deb)
# The product only: no test harness in the package.
if dpkg-deb -c "$deb" | grep -E 'sandbox\.py|/tests?/' >&2; then
  echo "build-deb: the package carries test files" >&2
  exit 1
fi
echo "$deb"
