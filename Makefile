# Every target runs `setup` first: a fresh Debian 12 machine needs nothing else.
PYTHON := .venv/bin/python
PYTEST := $(PYTHON) -m pytest

COVERAGE := $(PYTHON) -m coverage

.PHONY: setup demo demo-ovn check lint unit functional fuzz lab lab-full bench deb

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
	$(COVERAGE) run -m pytest -q tests
	@$(COVERAGE) combine -q
	$(COVERAGE) report --format=total | sed 's/^/line coverage of src\/ (unit, fuzz, functional): /; s/$$/%/'

lint: setup
	.venv/bin/ruff check src testsupport
	.venv/bin/mypy

unit: setup
	$(PYTEST) -q tests/unit

functional: setup
	$(PYTEST) -q tests/functional

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

bench: setup
	$(PYTHON) bench/run.py

# The Debian package (dpkg-buildpackage + debhelper): build/deb/ovs-ipsec_<version>_amd64.deb.
deb:
	@scripts/build-deb.sh
