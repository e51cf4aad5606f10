"""The one runner: output captured, or written to a file the caller reads line by line."""

from __future__ import annotations

import tempfile

from ovs_ipsec.runner import run


def test_output_to_a_file_never_comes_back_as_text():
    with tempfile.TemporaryFile("w+") as out:
        result = run(["sh", "-c", "seq 1 100000; echo problem >&2; exit 3"], check=False, stdout_file=out)
        out.seek(0)
        assert sum(1 for _ in out) == 100000
    assert (result.stdout, result.stderr, result.returncode) == ("", "problem\n", 3)


def test_output_captured_by_default():
    assert run(["sh", "-c", "echo hi"]).stdout == "hi\n"
