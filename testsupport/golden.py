"""Golden files: compare rendered output byte for byte; UPDATE_GOLDEN=1 rewrites them."""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "unit" / "golden"


def assert_golden(name: str, actual: str) -> None:
    path = GOLDEN_DIR / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(actual)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 once and review it"
    assert actual == path.read_text()


def captured(name: str) -> tuple[int, str, str]:
    """The exit status, stdout and stderr of a command captured in the lab (lab/guest/golden.py)."""
    head, rest = (GOLDEN_DIR / name).read_text().split("\n", 1)
    stdout, stderr = rest.removeprefix("--- stdout\n").split("--- stderr\n")
    return int(head.removeprefix("rc=")), stdout, stderr
