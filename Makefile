# Every target runs `setup` first: a fresh Debian 12 machine needs nothing else.
PYTHON := .venv/bin/python
PYTEST := $(PYTHON) -m pytest

.PHONY: setup demo demo-ovn check unit functional lab lab-extended bench deb

setup:
	@scripts/setup.sh

demo: setup
	$(PYTHON) scripts/demo.py

# OVN: a central and a full mesh of chassis, ipsec=true to ipsec=false.
demo-ovn: setup
	$(PYTHON) scripts/demo_ovn.py

# Unit tests, functional tests against real daemons, then the real-kernel lab.
check: setup
	$(PYTEST) -q tests

unit: setup
	$(PYTEST) -q tests/unit

functional: setup
	$(PYTEST) -q tests/functional

lab: setup
	lab/run.sh

# Every lab scenario, the extended systemd-host ones too (reboot without the guard, every auth mode
# of the switch from upstream, rollback): not part of make check.
lab-extended: setup
	lab/run.sh --extended

bench: setup
	$(PYTHON) bench/run.py

# The Debian package (dpkg-buildpackage + debhelper): build/deb/ovs-ipsec_<version>_amd64.deb.
deb:
	@scripts/build-deb.sh
