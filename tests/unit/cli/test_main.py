"""cli/main.py: where the monitor puts its pidfile, control socket and log, and how status finds it."""

from __future__ import annotations

import pytest

from ovs_ipsec.cli.main import SYSTEM_LOGDIR, SYSTEM_RUNDIR, default_unixctl_path, ovs_dirs
from ovs_ipsec.errors import OvsIpsecError

PYPI_RUNDIR = "/usr/local/var/run/openvswitch"   # python-ovs from PyPI
PYPI_LOGDIR = "/usr/local/var/log/openvswitch"


def dirs(database="unix:/var/run/openvswitch/db.sock", environ=None, existing=()):
    return ovs_dirs(database, environ or {}, PYPI_RUNDIR, PYPI_LOGDIR, isdir=lambda path: path in existing)


def test_the_database_socket_folder_is_the_run_directory_whatever_ovs_package_is_imported():
    assert dirs(existing={"/var/run/openvswitch"}) == ("/var/run/openvswitch", SYSTEM_LOGDIR)
    assert dirs("unix:/run/openvswitch/db.sock", existing={"/run/openvswitch"})[0] == "/run/openvswitch"


def test_environment_wins_as_for_every_ovs_tool():
    environ = {"OVS_RUNDIR": "/tmp/r", "OVS_LOGDIR": "/tmp/l"}
    assert dirs(environ=environ, existing={"/var/run/openvswitch", PYPI_LOGDIR}) == ("/tmp/r", "/tmp/l")


def test_without_a_local_socket_the_package_directory_only_if_it_exists():
    assert dirs("tcp:127.0.0.1:6640") == (SYSTEM_RUNDIR, SYSTEM_LOGDIR)
    assert dirs("tcp:127.0.0.1:6640", existing={PYPI_RUNDIR, PYPI_LOGDIR}) == (PYPI_RUNDIR, PYPI_LOGDIR)
    # A socket path whose folder does not exist says nothing about the installed Open vSwitch.
    assert dirs("unix:/nowhere/db.sock")[0] == SYSTEM_RUNDIR


def test_status_finds_the_monitor_through_its_pidfile(tmp_path):
    (tmp_path / "ovs-monitor-ipsec.pid").write_text("4242\n")
    assert default_unixctl_path({"OVS_RUNDIR": str(tmp_path)}) == f"{tmp_path}/ovs-monitor-ipsec.4242.ctl"


def test_status_names_every_place_it_looked(tmp_path):
    with pytest.raises(OvsIpsecError) as error:
        default_unixctl_path({"OVS_RUNDIR": str(tmp_path)})
    assert f"{tmp_path}/ovs-monitor-ipsec.pid" in str(error.value)
    assert f"{SYSTEM_RUNDIR}/ovs-monitor-ipsec.pid" in str(error.value)
