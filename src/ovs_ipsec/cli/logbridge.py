"""Python logging -> OVS's vlog, so --log-file, -v and `vlog/reopen` (logrotate) behave as upstream's.

Every record becomes exactly one line: its text goes through `text.printable`, so a value from
OVSDB quoted in a message (or in an exception) can never start a line of its own.
"""

from __future__ import annotations

import logging
import traceback

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


def install(module: str) -> None:
    """Route the `ovs_ipsec` loggers to vlog module `module`, and silence python-ovs's OVSDB
    message dumps. Call before ovs.vlog is initialised (handle_args).

    Not the root logger: ovs.vlog writes through Python logging itself, and would loop.
    """
    _silence_jsonrpc_messages()
    logger = logging.getLogger("ovs_ipsec")
    logger.handlers[:] = [VlogHandler(module)]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)  # vlog's own levels (-v, vlog/set) decide what is written


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
