#!/usr/bin/env bash
# Runs docs/GUIDE_SD14.md's commands, extracted from the guide, on a random-weight folder of the SD v1.4
# architecture (tests/test_guide_sd14.py::test_guide_sd14_runs_on_random_sd14_architecture). About 5 minutes and
# 4.5 GB of temporary disk on a 2-core machine (17 Dagster commands, each loading the 860 M-parameter UNet or at
# least Dagster): too long for `make test`, which skips it naming this script; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
DDR_CHECK_GUIDE_SD14=1 .venv/bin/python -m pytest -q -rs tests/test_guide_sd14.py "$@"
