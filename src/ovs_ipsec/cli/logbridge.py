"""Python logging -> OVS's vlog, so --log-file, -v and `vlog/reopen` (logrotate) behave as upstream's.

Every record becomes exactly one line: its text goes through `text.printable`, so a value from
OVSDB quoted in a message (or in an exception) can never start a line of its own.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

import ovs.unixctl
import ovs.vlog

from ..text import printable

_LEVELS = ((logging.CRITICAL, "emer"), (logging.ERROR, "err"), (logging.WARNING, "warn"),
           (logging.INFO, "info"), (logging.DEBUG, "dbg"))


class OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + "".join(traceback.format_exception(*record.exc_info)).strip()
        return printable(message)


class VlogHandler(logging.Handler):
    def __init__(self, module: str) -> None:
        super().__init__()
        self._vlog = ovs.vlog.Vlog(module)
        self.setFormatter(OneLineFormatter())

    def follow_levels(self, logger: logging.Logger) -> None:
        """Keep `logger` at the most verbose level vlog writes for this module (any destination),
        now and after every `vlog/set`. Call after ovs.vlog.handle_args.

        A record that no destination writes is then never made: at DEBUG every debug line was
        built, formatted and handed to vlog only to be dropped there, 15 % of a busy monitor's CPU."""
        def sync() -> None:
            enabled = [level for level, name in _LEVELS if getattr(self._vlog, f"{name}_is_enabled")()]
            logger.setLevel(min(enabled, default=logging.CRITICAL + 1))

        sync()
        command = ovs.unixctl.commands.get("vlog/set")
        if command is not None:
            set_levels = command.callback

            def set_and_follow(conn, argv, aux) -> None:
                try:
                    set_levels(conn, argv, aux)
                finally:
                    sync()

            command.callback = set_and_follow

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            for level, method in _LEVELS:
                if record.levelno >= level:
                    getattr(self._vlog, method)(message)
                    return
            self._vlog.dbg(message)
        except Exception:  # logging must never take the daemon down
            self.handleError(record)


def install(module: str) -> Callable[[], None]:
    """Route the `ovs_ipsec` loggers to vlog module `module`, and silence python-ovs's OVSDB
    message dumps. Call before ovs.vlog is initialised (handle_args), and what it returns after:
    from then on the loggers follow vlog's levels (VlogHandler.follow_levels).

    Not the root logger: ovs.vlog writes through Python logging itself, and would loop.
    """
    _silence_jsonrpc_messages()
    logger = logging.getLogger("ovs_ipsec")
    handler = VlogHandler(module)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)  # until vlog's levels are known
    return lambda: handler.follow_levels(logger)


class _NoMessageDumps(ovs.vlog.Vlog):
    """python-ovs's jsonrpc module logs every OVSDB message it sends or receives at debug level,
    and those carry options:psk and ESP keys. Its debug lines are dropped whatever `-v` or
    `vlog/set` ask for (a level clamp would not survive `vlog/set jsonrpc:dbg`); warnings stay."""

    def dbg_is_enabled(self) -> bool:
        return False

    def dbg(self, message, **kwargs) -> None:  # noqa: ARG002 - the signature of Vlog.dbg
        return None


def _silence_jsonrpc_messages() -> None:
    import ovs.jsonrpc

    if not isinstance(ovs.jsonrpc.vlog, _NoMessageDumps):
        ovs.jsonrpc.vlog = _NoMessageDumps("jsonrpc")
