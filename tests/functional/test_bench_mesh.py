"""The full-mesh benchmark (bench/mesh.py) at 3 hosts, ours on real daemons: the mesh is counted up
over VICI, one host's charon is killed and restarted, and the repair is counted with fresh SAs only."""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import mesh  # noqa: E402
from run import CHARON_CONF, Ours  # noqa: E402


def test_an_sa_with_the_killed_host_counts_only_when_younger_than_the_kill():
    fresh, stale = 1.0, 50.0
    peers = [{mesh.mesh_ip(2): stale, mesh.mesh_ip(3): stale},  # host 1
             {mesh.mesh_ip(1): fresh, mesh.mesh_ip(3): fresh},  # host 2: its charon was restarted
             {mesh.mesh_ip(1): stale, mesh.mesh_ip(2): fresh}]  # host 3
    state = mesh.mesh_state(peers, fresh_for=2, since=10.0)
    assert (state.up, state.total, state.missing) == (5, 6, ((1, 2),))
    assert mesh.mesh_state(peers).up == 6  # without the kill, every SA counts
    assert mesh.mesh_state([{}, {mesh.mesh_ip(1): 1.0}, {}]).missing[0] == (1, 2)
    # charon's ages are whole seconds: an SA made 0.3 s after the kill may say 1 at 0.9 s
    assert mesh.mesh_state([{mesh.mesh_ip(2): 1.0}, {mesh.mesh_ip(1): 1.0}], fresh_for=2, since=0.9).up == 2


def test_a_three_host_mesh_is_established_then_repaired_after_a_charon_kill():
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/charon-systemd"):
        pytest.skip("needs root and charon-systemd")
    args = argparse.Namespace(keep=False, mesh_limit=60.0, mesh_settle=3.0, mesh_kill=0)
    workdir = Path("/tmp/ovs-ipsec-tests") / f"mesh{secrets.token_hex(2)}"
    cell = mesh.mesh_cell("ours", 3, lambda impl, host: Ours(host, CHARON_CONF), CHARON_CONF, workdir, args)
    establish, repair = cell["establish"], cell["repair"]
    assert establish["established_s"] is not None, establish
    assert establish["ike_sas_per_host"] == [2, 2, 2]  # ours: one IKE SA per peering
    assert repair["killed_host"] == 2 and repair["repaired_s"] is not None, repair
    assert repair["connections_back_s"] is not None and repair["charon_back_s"] < 5
    assert repair["progress"][0][1] < 6  # the kill was seen: the victim's tunnels went down first
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert cell["prefix"] not in namespaces and not workdir.exists()
