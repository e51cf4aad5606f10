"""Untrusted text reaches people escaped: logs, tunnels/show, the status table, events."""

from __future__ import annotations

import logging
import os

import pytest

from testsupport.builders import desired, row
from ovs_ipsec.cli.logbridge import OneLineFormatter
from ovs_ipsec.model import GlobalConfig, ObservedState
from ovs_ipsec.status.events import open_events_file
from ovs_ipsec.status.render import render_show, render_table
from ovs_ipsec.status.snapshot import StatusSnapshot, build_snapshot
from ovs_ipsec.text import printable, shown
from ovs_ipsec.validate import CertificateFacts, validate

HOSTILE = "vx1\n\x1b[2J\x1b]0;owned\x07\u2028\u202e"


def test_printable_escapes_every_character_a_terminal_or_a_log_reader_would_act_on():
    assert printable(HOSTILE) == "vx1\\n\\x1b[2J\\x1b]0;owned\\x07\\u2028\\u202e"
    assert printable(printable(HOSTILE)) == printable(HOSTILE)  # idempotent
    assert printable("plain ünïcödé text") == "plain ünïcödé text"


def test_shown_quotes_and_cuts():
    assert shown("x" * 100) == "'" + "x" * 80 + "...'"
    assert shown("a\nb") == "'a\\nb'"


def test_status_outputs_escape_names_and_reasons_from_ovsdb():
    validated = validate(desired(row(HOSTILE, "geneve", remote_ip=HOSTILE, psk="x")), CertificateFacts(), 0)
    snapshot = build_snapshot(validated, {}, ObservedState({}, frozenset(), {}), {}, None, GlobalConfig(),
                              StatusSnapshot.empty(), 0)
    for text in (render_show(snapshot), render_table(snapshot.as_json(), 0)):
        assert "\x1b" not in text and "\u2028" not in text and "\u202e" not in text
        assert all(line.isprintable() for line in text.splitlines())
        assert "vx1\\n" in text


def test_a_log_record_is_one_printable_line_even_with_an_exception():
    formatter = OneLineFormatter()
    try:
        raise KeyError(HOSTILE)
    except KeyError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "tunnel %s failed", (HOSTILE,),
                                   exc_info=True)
        import sys
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line and line.isprintable() and line.startswith("tunnel vx1\\n")


def test_the_events_file_is_never_opened_through_a_symlink(tmp_path):
    target = tmp_path / "shadow"
    target.write_text("root:x:0:0\n")
    link = tmp_path / "events.json"
    link.symlink_to(target)
    with pytest.raises(OSError):
        open_events_file(str(link))
    assert target.read_text() == "root:x:0:0\n"
    path = tmp_path / "real.json"
    open_events_file(str(path)).close()
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
