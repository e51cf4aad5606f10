"""The main loop: OVSDB in, unixctl requests answered from the last status snapshot.

Everything slow happens in the reconciler's thread; this loop only moves frozen values around,
so `ovs-appctl` always gets an answer even while the IKE daemon is stuck.
"""

from __future__ import annotations

import json
import logging
import os
import time

import ovs.poller
import ovs.unixctl
import ovs.unixctl.server

from .. import __version__
from ..errors import OvsIpsecError
from ..netlink.xfrm import XfrmReader
from ..ovsdb.reader import OvsdbReader
from ..ovsdb.writer import InterfaceStatusWriter
from ..status.kernel import KernelView, policy_line, sa_line
from ..status.metrics import MetricsServer, render_metrics
from ..status.render import render_json, render_show, render_upstream_status
from .worker import Worker

log = logging.getLogger("ovs_ipsec.monitor")

REFRESH_WAIT_SECONDS = 15.0


class Wakeup:
    """A self-pipe: another thread calls `notify()`, the main loop's poller wakes up.

    Chosen over polling the snapshot on a short timer: the write-back follows a new status within
    milliseconds, and an idle monitor does not wake at all.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def notify(self) -> None:
        try:
            os.write(self._write, b"x")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is already pending

    def drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, poller: ovs.poller.Poller) -> None:
        poller.fd_wait(self._read, ovs.poller.POLLIN)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class Monitor:
    def __init__(self, reader: OvsdbReader, worker: Worker, unixctl_path: str | None,
                 wakeup: Wakeup | None = None, metrics_server: MetricsServer | None = None,
                 xfrm: XfrmReader | None = None) -> None:
        self._reader = reader
        self._xfrm = xfrm or XfrmReader()
        self._worker = worker
        self._exiting = False
        self._cleanup_on_exit = False
        # Observability: the status write-back (woken through `wakeup`, which the worker
        # notifies on each new snapshot) and the optional metrics listener.
        self._wakeup = wakeup or Wakeup()
        self._status_writer = InterfaceStatusWriter(reader.idl, reader.remote)
        self._metrics_server = metrics_server
        self._register_commands()
        # Mode 0700 whatever the daemon's umask: anyone who can connect can call `exit`.
        previous_umask = os.umask(0o077)
        try:
            error, self._server = ovs.unixctl.server.UnixctlServer.create(unixctl_path, version=__version__)
        finally:
            os.umask(previous_umask)
        if error:
            raise OvsIpsecError(f"could not create the unixctl socket {unixctl_path or '(default)'}")

    def run(self) -> None:
        self._worker.start()
        if self._metrics_server is not None:
            self._metrics_server.start(self.metrics_text)
        try:
            while not self._exiting:
                self._server.run()
                if self._exiting:
                    break
                if self._reader.run():
                    self._worker.submit(self._reader.snapshot())
                    # Hand the GIL to the worker now rather than after this pass's bookkeeping:
                    # the change reaches the IKE daemon a few hundred microseconds sooner.
                    time.sleep(0)
                self._wakeup.drain()
                self._status_writer.run(self._worker.snapshot)
                poller = ovs.poller.Poller()
                self._server.wait(poller)
                self._reader.wait(poller)
                self._wakeup.wait(poller)
                self._status_writer.wait(poller)
                poller.block()
        finally:
            if self._metrics_server is not None:
                self._metrics_server.close()
            if self._cleanup_on_exit:
                self._status_writer.clear()  # the connections are gone: so is their status
            self._server.close()
            self._status_writer.close()
            self._reader.close()
            self._wakeup.close()

    def metrics_text(self) -> str:
        """The Prometheus text; safe from any thread (the snapshot is immutable)."""
        return render_metrics(self._worker.snapshot, self._worker.queue_depth(), time.time())

    # -- unixctl ---------------------------------------------------------------------------------

    def _register_commands(self) -> None:
        # Upstream's commands (tools and tutorials use them), with upstream's output where tools parse it.
        ovs.unixctl.command_register("tunnels/show", "[--json]", 0, 1, self._tunnels_show, None)
        ovs.unixctl.command_register("ipsec/status", "[--json]", 0, 1, self._ipsec_status, None)
        ovs.unixctl.command_register("xfrm/policies", "[--json]", 0, 1, self._xfrm_policies, None)
        ovs.unixctl.command_register("xfrm/state", "[--json]", 0, 1, self._xfrm_state, None)
        ovs.unixctl.command_register("list-commands", "", 0, 0, ovs.unixctl._unixctl_help, None)
        ovs.unixctl.command_register("refresh", "", 0, 0, self._refresh, None)
        ovs.unixctl.command_register("metrics/show", "", 0, 0, self._metrics_show, None)
        ovs.unixctl.command_register("exit", "[--no-cleanup]", 0, 1, self._exit, None)

    def _tunnels_show(self, conn, argv, _aux) -> None:
        if _json_flag(conn, "tunnels/show", argv) is None:
            return
        snapshot = self._worker.snapshot
        conn.reply(render_json(snapshot) if argv else render_show(snapshot, self._kernel_view()))

    def _ipsec_status(self, conn, argv, _aux) -> None:
        as_json = _json_flag(conn, "ipsec/status", argv)
        if as_json is not None:
            conn.reply(render_json(self._worker.snapshot) if as_json else render_upstream_status(self._worker.snapshot))

    def _xfrm_policies(self, conn, argv, _aux) -> None:
        as_json = _json_flag(conn, "xfrm/policies", argv)
        if as_json is not None:
            view = self._kernel_view()
            self._reply_kernel(conn, view, view.policies, policy_line, as_json)

    def _xfrm_state(self, conn, argv, _aux) -> None:
        as_json = _json_flag(conn, "xfrm/state", argv)
        if as_json is not None:
            view = self._kernel_view()
            self._reply_kernel(conn, view, view.states, sa_line, as_json)

    def _kernel_view(self) -> KernelView:
        """The SPD and SAD now, read over netlink (a few milliseconds): never the keys."""
        try:
            return KernelView(self._xfrm.policies(), self._xfrm.states())
        except OvsIpsecError as exc:
            return KernelView(error=str(exc))

    @staticmethod
    def _reply_kernel(conn, view: KernelView, items, line, as_json: bool) -> None:
        if view.error:
            conn.reply_error(view.error)
        elif as_json:
            conn.reply(json.dumps([item.as_json() for item in items], indent=2) + "\n")
        else:
            conn.reply("".join(line(item) + "\n" for item in items) or "(none)\n")

    def _metrics_show(self, conn, _argv, _aux) -> None:
        conn.reply(self.metrics_text())

    def _refresh(self, conn, _argv, _aux) -> None:
        started = time.monotonic()
        if self._worker.refresh(timeout=REFRESH_WAIT_SECONDS):
            conn.reply(f"refreshed in {time.monotonic() - started:.2f} s\n")
        else:
            conn.reply(f"refresh still running after {REFRESH_WAIT_SECONDS:.0f} s; see the log\n")

    def _exit(self, conn, argv, _aux) -> None:
        if argv and argv != ["--no-cleanup"]:
            # Upstream answered success here, so a typo silently did a full cleanup-less exit.
            conn.reply_error(f"unrecognized parameter: {argv[0]} (usage: exit [--no-cleanup])")
            return
        cleanup = not argv
        log.info("exiting%s", " and removing every connection we created" if cleanup else " (no cleanup)")
        self._worker.stop(cleanup=cleanup)
        self._exiting = True
        self._cleanup_on_exit = cleanup
        conn.reply(None)


def _json_flag(conn, command: str, argv: list[str]) -> bool | None:
    """True for `--json`, False for no argument; None (after replying with an error) for anything else."""
    if not argv:
        return False
    if argv == ["--json"]:
        return True
    conn.reply_error(f"unrecognized parameter: {argv[0]} (usage: {command} [--json])")
    return None
