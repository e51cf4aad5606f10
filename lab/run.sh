#!/bin/bash
# The lab's one entry point (`make lab`, tests/lab/test_lab.py):
#   lab/run.sh                  build what is stale, boot the VM once, run every scenario
#   lab/run.sh --only gre-psk   run a subset (comma separated names from lab/scenarios.toml)
#   lab/run.sh --help           all options (build only, interactive shell, timeouts)
# Exit status: 0 when every scenario passed, 1 when one failed, 2 when the lab itself broke.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$here/setup.sh"
# The driver needs only the standard library of Python >= 3.11 (tomllib).
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "${LAB_PYTHON:-python3}" -m labhost "$@"
