"""Where the lab reads its inputs and writes its cache and results."""

import os
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent   # lab/
REPO = LAB.parent                              # the project's working tree
GUEST = LAB / "guest"                          # files that run inside the VM
SCENARIOS = LAB / "scenarios.toml"

# CI starts from a fresh clone; pointing OVS_IPSEC_LAB_CACHE at a directory that outlives
# the clone keeps the ~1 minute debootstrap out of every run.
CACHE = Path(os.environ.get("OVS_IPSEC_LAB_CACHE", LAB / "cache")).resolve()
RESULTS = LAB / "results"
