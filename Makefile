# Every target runs `setup` first: a fresh Debian 12 machine needs nothing else.
PYTHON := .venv/bin/python
PYTEST := $(PYTHON) -m pytest

.PHONY: setup demo demo-ovn check unit functional lab lab-full bench

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

# The real-kernel lab: every scenario on Debian 12, the [plan] subset on Debian 13 (as make check).
lab: setup
	lab/run.sh

# Every scenario on every distribution (Debian 12 and Debian 13): about 15 minutes.
lab-full: setup
	lab/run.sh --full

bench: setup
	$(PYTHON) bench/run.py
