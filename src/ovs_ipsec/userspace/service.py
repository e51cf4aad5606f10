"""The `ovs-ipsec userspace-esp` process: OVSDB in, packets through, `esp/show` out.

One thread does everything: the datapath's sockets, the OVSDB IDL and the unixctl server share
one poll(). Under load the loop drains up to BATCH packets per socket and then looks at OVSDB
and unixctl at most every CONTROL_INTERVAL, so control traffic neither starves nor slows the
packets; when idle it sleeps in poll() until a packet, an OVSDB update or a request arrives.
"""

from __future__ import annotations

import logging
import time

import ovs.poller
import ovs.unixctl
import ovs.unixctl.server

from .. import __version__
from ..errors import OvsIpsecError
from ..runner import run
from .datapath import Datapath
from .engine import Engine
from .keysource import tunnels_from_kernel
from .ovsdb import EspOvsdbReader
from .sa import Invalid, TunnelRow, validate, validate_ike
from .status import ServiceStatus, render_json, render_text
from .xfrm import KnownSa, parse_xfrm_state

log = logging.getLogger("ovs_ipsec.userspace")

BATCH = 64
CONTROL_INTERVAL = 0.02  # seconds between two looks at OVSDB and unixctl while packets flow
HOUSEKEEPING_INTERVAL = 1.0  # ARP for br-phy's MAC until learned; path MTU refresh
PATH_MTU_INTERVAL = 10.0
KERNEL_SA_INTERVAL = 1.0  # --ike-keys: how often the kernel's SAs are read (rekeys show up within it)


def read_kernel_sas() -> list[KnownSa]:
    """The kernel's ESP SAs with their keys (root). The output is parsed, never logged."""
    return parse_xfrm_state(run(["ip", "-s", "xfrm", "state"], timeout=10).stdout)


class EspService:
    def __init__(self, reader: EspOvsdbReader, datapath: Datapath, engine: Engine,
                 unixctl_path: str | None, clock=time.monotonic, kernel_sas=None) -> None:
        self._reader = reader
        self._datapath = datapath
        self._engine = engine
        self._clock = clock
        # --ike-keys: a callable returning the kernel's SAs (read_kernel_sas), else None.
        self._kernel_sas = kernel_sas
        self._next_kernel_read = 0.0
        self._rows: tuple[TunnelRow, ...] = ()
        self._kernel: list[KnownSa] = []
        self._invalid: tuple[Invalid, ...] = ()
        self._exiting = False
        self._next_housekeeping = 0.0
        self._next_path_mtu = 0.0
        ovs.unixctl.command_register("esp/show", "[--json]", 0, 1, self._show, None)
        ovs.unixctl.command_register("exit", "", 0, 0, self._exit, None)
        error, self._server = ovs.unixctl.server.UnixctlServer.create(unixctl_path, version=__version__)
        if error:
            raise OvsIpsecError(f"could not create the unixctl socket {unixctl_path or '(default)'}")

    def status(self) -> ServiceStatus:
        counters = self._datapath.counters()
        return ServiceStatus(self._engine.status(), self._invalid, self._datapath.uplink_name,
                             {"uplink_frames": counters.uplink_frames, "wire_packets": counters.wire_packets,
                              "send_errors": dict(self._datapath.send_errors)})

    def run(self) -> None:
        next_control = 0.0
        try:
            while not self._exiting:
                now = self._clock()
                if now >= next_control:
                    self._control(now)
                    next_control = now + CONTROL_INTERVAL
                    if self._exiting:
                        break
                moved = self._datapath.pump(self._engine, BATCH)
                if moved >= BATCH:
                    continue  # still busy: no poll() until the queues run dry
                poller = ovs.poller.Poller()
                self._server.wait(poller)
                self._reader.wait(poller)
                for sock in self._datapath.sockets():
                    poller.fd_wait(sock, ovs.poller.POLLIN)
                poller.timer_wait(max(0, int((self._next_housekeeping - self._clock()) * 1000)))
                poller.block()
                next_control = 0.0  # woken up: it may be OVSDB or unixctl
        finally:
            self._server.close()
            self._reader.close()
            self._datapath.close()

    def _control(self, now: float) -> None:
        self._server.run()
        changed = False
        if self._reader.run():
            self._rows = self._reader.rows()
            changed = True
        if self._kernel_sas is not None and now >= self._next_kernel_read:
            self._next_kernel_read = now + KERNEL_SA_INTERVAL
            try:
                kernel = self._kernel_sas()
            except OvsIpsecError as exc:
                log.warning("cannot read the kernel's SAs: %s", exc)
                kernel = self._kernel
            if kernel != self._kernel:
                self._kernel, changed = kernel, True
        if changed:
            self._reconfigure()
        if self._datapath.mtu_changed or now >= self._next_path_mtu:
            self._datapath.mtu_changed = False
            self._engine.update_path_mtu(self._datapath.path_mtu)
            self._next_path_mtu = now + PATH_MTU_INTERVAL
        if now >= self._next_housekeeping:
            self._datapath.send_uplink(self._engine.bridge_mac_requests())
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL

    def _reconfigure(self) -> None:
        config = validate(self._rows)
        tunnels, invalid = config.tunnels, config.invalid
        if self._kernel_sas is not None:
            ike, ike_invalid = validate_ike(self._rows)
            keyed, waiting = tunnels_from_kernel(ike, self._kernel)
            tunnels, invalid = tunnels + keyed, invalid + ike_invalid + waiting
        for entry in invalid:
            if entry not in self._invalid:
                log.warning("%s", entry.reason)
        self._invalid = invalid
        self._engine.configure(tunnels, self._datapath.path_mtu)
        self._next_housekeeping = 0.0  # new local_ip: learn br-phy's MAC now

    # -- unixctl ---------------------------------------------------------------------------------

    def _show(self, conn, argv, _aux) -> None:
        if argv and argv != ["--json"]:
            conn.reply_error(f"unrecognized parameter: {argv[0]} (usage: esp/show [--json])")
            return
        status = self.status()
        conn.reply(render_json(status) if argv else render_text(status))

    def _exit(self, conn, _argv, _aux) -> None:
        log.info("exiting")
        self._exiting = True
        conn.reply(None)
