# Every target runs `setup` first: a fresh Debian 12 machine needs nothing else.
PYTHON := .venv/bin/python
PYTEST := $(PYTHON) -m pytest

COVERAGE := $(PYTHON) -m coverage

.PHONY: setup demo demo-ovn check lint unit functional functional-upstream fuzz lab lab-full lab-upstream bench deb

setup:
	@scripts/setup.sh

demo: setup
	$(PYTHON) scripts/demo.py

# OVN: a central and a full mesh of chassis, ipsec=true to ipsec=false.
demo-ovn: setup
	$(PYTHON) scripts/demo_ovn.py

# Lint and types, then unit tests, the quick fuzz subset, functional tests against real daemons
# and the real-kernel lab; line coverage of src/ (the tests and every monitor they start).
check: setup lint
	@rm -rf .coverage-data
	$(COVERAGE) run -m pytest -q -m "not upstream_full" tests
	@$(COVERAGE) combine -q
	$(COVERAGE) report --format=total | sed 's/^/line coverage of src\/ (unit, fuzz, functional): /; s/$$/%/'

lint: setup
	.venv/bin/ruff check src testsupport
	.venv/bin/mypy

unit: setup
	$(PYTEST) -q tests/unit

functional: setup
	$(PYTEST) -q tests/functional

# The rest of upstream's own cases and of the mixed-cluster matrix (ours against Debian's
# ovs-monitor-ipsec), which make check leaves out for time (marker upstream_full).
functional-upstream: setup
	$(PYTEST) -q -m upstream_full tests/functional

# Upstream's system-ipsec.at cases and the mixed clusters on the real kernel (lab/scenarios.toml,
# issue 13), all of them on Debian 12: about 10 minutes of VM. make check runs three of them.
LAB_UPSTREAM := geneve-psk-defaultroute,geneve-psk-defaultroute-libreswan,geneve-ca-defaultroute-libreswan,vxlan-psk-ipv6,vxlan-psk-ipv6-defaultroute,vxlan-psk-ipv6-libreswan,vxlan-psk-ipv6-defaultroute-libreswan,geneve-psk-custom-conf-libreswan,geneve-psk-late-peer,geneve-psk-late-peer-libreswan,geneve-psk-upstream-peer,geneve-psk-upstream-initiates,gre-ca-upstream-peer,vxlan-ca-upstream-initiates,vxlan-psk-upstream-peer-libreswan,geneve-psk-upstream-initiates-libreswan,geneve-ca-upstream-peer-libreswan,gre-ca-upstream-initiates-libreswan,geneve-psk-third-host,geneve-psk-third-host-libreswan,geneve-psk-ipv6-third-host-libreswan

# Property-based fuzzing with the consumers as oracles, 17,000 cases per property (over 100,000 in
# all); prints the count and the escapes (must be 0).
fuzz: setup
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-17000} $(PYTEST) -q -p no:cacheprovider tests/fuzz

# The real-kernel lab: every scenario on Debian 12, the [plan] subset on Debian 13 (as make check).
lab: setup
	lab/run.sh

# Every scenario on every distribution (Debian 12 and Debian 13), the extended systemd-host ones
# too (reboot without the guard, every auth mode of the switch from upstream, rollback).
lab-full: setup
	lab/run.sh --full

lab-upstream: setup
	lab/run.sh --distro debian12 --only $(LAB_UPSTREAM)

bench: setup
	$(PYTHON) bench/run.py

# The Debian package (dpkg-buildpackage + debhelper): build/deb/ovs-ipsec_<version>_amd64.deb.
deb:
	@scripts/build-deb.sh
