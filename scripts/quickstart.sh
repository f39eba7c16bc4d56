#!/usr/bin/env bash
# One command from a fresh checkout to trained multi-task adapters: sets up .venv (scripts/setup.sh), then trains
# EPT on MiniLM over five GLUE tasks (configs/quickstart.yaml) into runs/quickstart and prints the per-task metrics
# beside each task's majority level at the end.
#
# Threads: one torch thread unless OMP_NUM_THREADS says otherwise. Measured on this project's 2 cores with other jobs
# running (README, Quickstart): 16 steps took 45.5 s with one thread and 143.4 s with two (three times slower), and
# one thread stayed at 43.9 s with an extra CPU-bound process beside it.
#
# Data: $EPT_DATA_DIR if set, else the offline data folder ../shared/data beside the repository when it exists,
# else the Hugging Face hub (scripts/env.sh). Extra arguments override the config, e.g.
#     bash scripts/quickstart.sh --max_steps 20 --output_dir runs/try
set -euo pipefail
source "$(dirname "$0")/env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
bash "$repo_root/scripts/setup.sh"
cd "$repo_root"
echo "data: ${EPT_DATA_DIR:-Hugging Face hub}"
exec "$venv/bin/ept" train configs/quickstart.yaml "$@"
