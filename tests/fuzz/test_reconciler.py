"""The reconcile loop survives arbitrary rows, and nothing malformed reaches the IKE daemon."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from testsupport.builders import desired
from testsupport.strategies import rows, skb_marks
from ovs_ipsec.daemon.reconciler import Reconciler
from ovs_ipsec.daemon.worker import run_due_work
from ovs_ipsec.daemon.workqueue import WorkQueue
from ovs_ipsec.pki.inspect import CertificateInspector
from ovs_ipsec.planner import LoadConn, LoadSecret
from ovs_ipsec.status.events import EventLog
from ovs_ipsec.validate import fields

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "daemon"))
from testsupport.fakes import FakeBackend  # noqa: E402


@given(st.lists(st.tuples(rows, skb_marks), min_size=1, max_size=4))
def test_the_reconciler_survives_arbitrary_rows(count, passes):
    count("reconciler")
    backend = FakeBackend()
    queue = WorkQueue(60)
    reconciler = Reconciler(backend, CertificateInspector(), queue, events=EventLog(logging.getLogger("fuzz")))
    now = 1000.0
    for found_rows, mark in passes:
        run_due_work(reconciler, queue, desired(*found_rows, **({"skb_mark": mark} if mark else {})), now)
        assert reconciler.snapshot.reconcile.error is None
        now += 61
    for action in backend.applied:
        if isinstance(action, (LoadConn, LoadSecret)):
            for tunnel in action.peering.tunnels:
                assert fields.NAME_PATTERN.fullmatch(tunnel.name)
                assert fields.address(tunnel.remote_ip, "remote_ip") == tunnel.remote_ip
                assert tunnel.local_ip is None or fields.address(tunnel.local_ip, "local_ip") == tunnel.local_ip
