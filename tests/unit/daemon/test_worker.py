"""The worker thread: other threads hand it work and never wait on the IKE daemon."""

from __future__ import annotations

import threading
import time

from testsupport.builders import desired, row
from testsupport.fakes import FakeBackend
from ovs_ipsec.daemon.reconciler import Reconciler
from ovs_ipsec.daemon.worker import Worker
from ovs_ipsec.daemon.workqueue import WorkQueue
from ovs_ipsec.model import TunnelState
from ovs_ipsec.pki.inspect import CertificateInspector

PSK = dict(local_ip="10.0.0.1", remote_ip="10.0.0.2", psk="swordfish")


def make_worker(backend: FakeBackend) -> tuple[Worker, threading.Event]:
    queue = WorkQueue(resync_interval=60)
    published = threading.Event()
    reconciler = Reconciler(backend, CertificateInspector(), queue, on_publish=published.set)
    return Worker(reconciler, queue, backend, clock=time.time), published


def test_nothing_happens_before_the_first_ovsdb_snapshot_then_it_converges():
    backend = FakeBackend()
    worker, published = make_worker(backend)
    worker.start()
    try:
        assert not published.wait(0.2) and backend.observed == []
        worker.submit(desired(row("gnv", "geneve", **PSK)))
        assert published.wait(5)
        assert backend.kinds() == ["LoadSecret", "LoadConn", "Initiate"]
        assert worker.refresh(timeout=5)  # a full comparison, answered when done
        assert backend.observed[-1] is None
        (tunnel,) = worker.snapshot.tunnels
        assert tunnel.state is TunnelState.LOADED
    finally:
        worker.stop(cleanup=True)
    assert backend.conns == {} and backend.secrets == {}  # exit with cleanup removes ours


def test_a_pass_that_raises_does_not_stop_the_worker():
    backend = FakeBackend()
    backend.explode_observe = True
    worker, published = make_worker(backend)
    worker.start()
    try:
        worker.submit(desired(row("gnv", "geneve", **PSK)))
        assert published.wait(5) and worker.snapshot.reconcile.error
        backend.explode_observe = False
        assert worker.refresh(timeout=5) and worker.snapshot.reconcile.error is None
    finally:
        worker.stop(cleanup=False)
    assert backend.conns  # exit without cleanup keeps everything
