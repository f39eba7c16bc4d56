#!/usr/bin/env bash
# Set up the environment and run the whole test suite (the slow real-model tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
source "$(dirname "$0")/env.sh"
bash "$repo_root/scripts/setup.sh"
cd "$repo_root"
export HF_HUB_OFFLINE=1
exec "$venv/bin/python" -m pytest -n 2 --dist loadfile "$@"
