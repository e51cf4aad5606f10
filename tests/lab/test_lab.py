"""The real-kernel lab (lab/run.sh) as one pytest test.

It boots Debian 12's kernel under QEMU and runs the scenarios of lab/scenarios.toml that are not
`extended`, then Debian 13's for its [plan] subset: two hosts in network namespaces with OVS on
the kernel datapath, an IKE daemon (charon or pluto) and our monitor, a tunnel per scenario (made
with ovs-vsctl, or by OVN), ping over it and a capture proving it is ESP on the wire. A third boot
runs two systemd-nspawn machines booting Debian 12's systemd with our .deb (or Debian's
openvswitch-ipsec) installed: the service lifecycle, the switch from upstream and a reboot. See
lab/README.md; `make lab-full` runs every scenario, the extended ones too, on both releases.
Deselect with `-m "not lab"`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "lab" / "run.sh"
LATEST = REPO / "lab" / "results" / "latest.json"
# The driver stops each VM itself after VM_TIMEOUT; the outer limit only guards the builds.
VM_TIMEOUT = 1200  # enough for every scenario to wait out its own 60 s limit, should all fail
OUTER_TIMEOUT = 4200  # three boots and three cold builds (two base images, the systemd host image)
DISTROS = {"debian12", "debian13"}
BOOTS = {*DISTROS, "debian12-systemd"}


@pytest.mark.lab
def test_lab_matrix():
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (apt-get, debootstrap)")
    LATEST.unlink(missing_ok=True)
    proc = subprocess.run([str(RUN), "--timeout", str(VM_TIMEOUT)], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=OUTER_TIMEOUT)
    print(proc.stdout)   # the driver's progress and the results table (shown with -rA or -s)
    assert LATEST.exists(), (f"lab/run.sh exited {proc.returncode} without results:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(LATEST.read_text())
    # Every boot ran scenarios (a missing one would otherwise pass silently).
    assert {s["distro"] for s in report["scenarios"]} == DISTROS and set(report["distros"]) == BOOTS
    failed = [s for s in report["scenarios"] if not s["pass"]]
    assert not failed and proc.returncode == 0, (
        f"lab/run.sh exited {proc.returncode}; failed scenarios (logs in lab/results/<name>/):\n"
        + "\n".join(json.dumps(s) for s in failed) + "\n" + proc.stdout[-3000:])
