#!/usr/bin/env bash
# One command from a fresh checkout to trained multi-task adapters: sets up .venv (scripts/setup.sh), then trains
# EPT on MiniLM over the 8 GLUE tasks (configs/quickstart.yaml) and prints the per-task metrics at the end.
#
# Data: $EPT_DATA_DIR if set, else the offline data folder ../shared/data beside the repository when it exists,
# else the Hugging Face hub (scripts/env.sh). Extra arguments override the config, e.g.
#     bash scripts/quickstart.sh --max_steps 20 --output_dir runs/try
set -euo pipefail
source "$(dirname "$0")/env.sh"
bash "$repo_root/scripts/setup.sh"
cd "$repo_root"
echo "data: ${EPT_DATA_DIR:-Hugging Face hub}"
exec "$venv/bin/ept" train configs/quickstart.yaml "$@"
