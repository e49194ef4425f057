#!/usr/bin/env bash
# The main job: set up (first time only) and run the main experiment on the embedded default.
# Extra arguments go to `fedsec run`, e.g. -c num-server-rounds=5
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash experiments/setup.sh
exec .venv/bin/python -m fedsec.launch experiments/conf/main.toml "$@"
