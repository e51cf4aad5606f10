"""Fixtures: private hosts in network namespaces with real ovsdb-server, charon and our monitor.

KEEP_SANDBOX=1 keeps each test's work folder (logs, databases) under /tmp/ovs-ipsec-tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from testsupport.daemons import LibreSwan, StrongSwan, libreswan_missing
from testsupport.sandbox import Sandbox


def pytest_collection_modifyitems(items):
    for item in items:
        if "/functional/" in str(item.fspath):
            item.add_marker(pytest.mark.functional)


def _missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ovsdb-server", "ovs-vsctl", "ovs-appctl", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run make setup)"
    if not os.path.exists("/usr/sbin/charon-systemd"):
        return "charon-systemd is not installed (run make setup)"
    return None


@pytest.fixture
def sandbox(request):
    reason = _missing_requirements()
    if reason:
        pytest.skip(reason)
    prefix = "oi" + secrets.token_hex(2)
    # Short: unix socket paths are limited to 107 bytes, and charon's config syntax dislikes brackets.
    workdir = Path("/tmp/ovs-ipsec-tests") / prefix
    box = Sandbox(prefix, workdir, keep_files=bool(os.environ.get("KEEP_SANDBOX")))
    (workdir / "TEST").write_text(request.node.nodeid + "\n")
    yield box
    box.close()


@pytest.fixture
def two_hosts(sandbox):
    """Hosts a (10.231.0.1, fd00:231::1) and b (.2, ::2), each running ovsdb-server, charon, monitor."""
    a = sandbox.add_host("a", "10.231.0.1/24", "fd00:231::1/64")
    b = sandbox.add_host("b", "10.231.0.2/24", "fd00:231::2/64")
    for host in (a, b):
        host.start_ovsdb()
        host.start_charon()
        host.start_monitor()
    return a, b


@pytest.fixture(params=[StrongSwan(), LibreSwan()], ids=lambda swan: swan.name)
def swan(request):
    if request.param.name == "libreswan" and libreswan_missing():
        pytest.skip(libreswan_missing())
    return request.param


def make_hosts(sandbox, daemon):
    a = sandbox.add_host("a", "10.231.0.1/24", "fd00:231::1/64", ike_daemon=daemon)
    b = sandbox.add_host("b", "10.231.0.2/24", "fd00:231::2/64", ike_daemon=daemon)
    for host in (a, b):
        host.start_ovsdb()
        host.start_ike_daemon()
        host.start_monitor()
    return a, b


@pytest.fixture
def hosts(sandbox, swan):
    return make_hosts(sandbox, swan.name)


@pytest.fixture
def lsw_hosts(sandbox):
    reason = libreswan_missing()
    if reason:
        pytest.skip(reason)
    return make_hosts(sandbox, "libreswan")
