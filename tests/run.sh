#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash experiments/setup.sh
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
set +e
# Two workers: the end-to-end tests spend much of their time waiting on Flower (start-up, heartbeats),
# so they overlap with the CPU-bound unit tests. FEDSEC_TEST_WORKERS=0 runs in one process.
workers="${FEDSEC_TEST_WORKERS:-2}"
xdist=()
# loadgroup: tests sharing a module fixture (one Flower run) carry one xdist_group and go to one worker;
# the rest are handed out in collection order, which tests/conftest.py sorts longest-first.
if [ "$workers" != "0" ] && .venv/bin/python -c "import xdist" 2>/dev/null; then xdist=(-n "$workers" --dist loadgroup); fi
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${xdist[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
