"""The monitor as a service starts it: default paths from the database socket, fatal errors that
fail the start even with --detach, and upstream's vlog module name. Real ovsdb-server."""

from __future__ import annotations

import os
import subprocess
import sys

PROGRAM = [sys.executable, "-m", "ovs_ipsec.cli.main", "monitor"]


def _env_without_ovs_dirs():
    return {k: v for k, v in os.environ.items() if not k.startswith("OVS_")}


def test_fatal_error_after_detach_fails_the_start_and_is_logged(sandbox):
    host = sandbox.add_host("a", "10.231.0.1/24")
    host.start_ovsdb()
    log = host.workdir / "fatal.log"
    proc = subprocess.run(host.netns(*PROGRAM, host.db, f"--vici-uri=unix://{host.vici_path}",
                                     f"--unixctl={host.workdir}/missing/ovs-monitor-ipsec.ctl",
                                     f"--pidfile={host.workdir}/fatal.pid", f"--log-file={log}",
                                     "--detach", "--no-chdir", "-vconsole:off"),
                          env=host.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "could not create the unixctl socket" in proc.stderr      # the journal, under systemd
    assert "cannot start: could not create the unixctl socket" in log.read_text()
    assert not (host.workdir / "fatal.pid").exists()


def test_default_paths_follow_the_database_socket_and_upstream_module_name_works(sandbox):
    host = sandbox.add_host("a", "10.231.0.1/24")
    host.start_ovsdb()
    env = _env_without_ovs_dirs()   # as under systemd: no OVS_RUNDIR; the `ovs` package may be PyPI's
    subprocess.run(host.netns(*PROGRAM, host.db, f"--vici-uri=unix://{host.vici_path}", "--pidfile",
                              f"--log-file={host.workdir}/ovs-monitor-ipsec.log", "--detach", "--no-chdir",
                              "-vconsole:off", "-vovs-monitor-ipsec:dbg"),
                   env=env, check=True, timeout=60)
    pid = int((host.workdir / "ovs-monitor-ipsec.pid").read_text())
    try:
        assert (host.workdir / f"ovs-monitor-ipsec.{pid}.ctl").exists()
        appctl_env = {**env, "OVS_RUNDIR": str(host.workdir)}   # where ovs-appctl looks, like /run/openvswitch
        levels = subprocess.run(["ovs-appctl", "-t", "ovs-monitor-ipsec", "vlog/list"], env=appctl_env,
                                capture_output=True, text=True, check=True).stdout
        module = next(line.split() for line in levels.splitlines() if line.startswith("ovs-monitor-ipsec "))
        assert module[3] == "dbg", levels   # console, syslog, file: -v set the file level
        subprocess.run(["ovs-appctl", "-t", "ovs-monitor-ipsec", "vlog/set", "ovs-monitor-ipsec:file:info"],
                       env=appctl_env, check=True, capture_output=True)
        status = subprocess.run([sys.executable, "-m", "ovs_ipsec.cli.main", "status", "--json"], env=appctl_env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert '"tunnels"' in status.stdout
    finally:
        subprocess.run(["ovs-appctl", "-t", f"{host.workdir}/ovs-monitor-ipsec.{pid}.ctl", "exit", "--no-cleanup"],
                       capture_output=True, timeout=60)
