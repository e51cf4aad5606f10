"""Property-based fuzzing of read -> validate -> plan -> render, with the real consumers as oracles.

FUZZ_EXAMPLES (default 100: the quick subset in `make check`) is the number of cases per property;
`make fuzz` sets it so that the run covers at least 100,000 cases, and prints the count and the
number of escapes (a case whose output a consumer read differently from what we meant; must be 0).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
settings.register_profile("fuzz", max_examples=EXAMPLES, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.load_profile("fuzz")

CASES: dict[str, int] = {}
ESCAPES: dict[str, int] = {}


@pytest.fixture(scope="session")
def count():
    """count(target, n=1): cases run (a name without a space) or outputs checked ("<target> files")."""
    def add(target: str, n: int = 1) -> None:
        CASES[target] = CASES.get(target, 0) + n
    return add


def pytest_runtest_logreport(report):
    if report.when == "call" and report.failed and "/fuzz/" in report.nodeid:
        ESCAPES[report.nodeid] = ESCAPES.get(report.nodeid, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if CASES:
        # Cases are generated inputs (sets of rows); "files", "messages" and "policies" count the outputs
        # that went through a consumer's own parser.
        total = sum(n for name, n in CASES.items() if " " not in name)
        per_target = ", ".join(f"{name} {n:,}" for name, n in sorted(CASES.items()))
        terminalreporter.write_line(f"fuzz: {total:,} cases ({per_target}), {sum(ESCAPES.values())} escapes")


def _namespace():
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    name = "oifz" + secrets.token_hex(2)
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


@pytest.fixture(scope="session")
def guard_netns():
    """A private network namespace whose XFRM policies are the guard oracle's alone."""
    name = _namespace()
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="session")
def pluto():
    netns = _namespace()
    from testsupport.pluto import LIBRESWAN_ROOT, Pluto

    if not os.path.exists(f"{LIBRESWAN_ROOT}/usr/libexec/ipsec/pluto"):
        pytest.skip("LibreSwan is not extracted (run make setup)")
    workdir = Path("/tmp/ovs-ipsec-tests") / netns
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = Pluto(netns, workdir, ["ip", "netns", "exec", netns])
    daemon.start()
    yield daemon
    daemon.stop()
    subprocess.run(["ip", "netns", "del", netns], check=False)
    shutil.rmtree(workdir, ignore_errors=True)
