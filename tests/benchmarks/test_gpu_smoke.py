"""``benchmarks/gpu.py --device cpu --quick`` runs end to end and writes a complete result, so the device benchmark
cannot rot while no accelerator runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu.py"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_gpu_benchmark_quick_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)]
    # The device tests of one method from one file: the smoke run checks the machinery, not the suite.
    command += ["--tests-path", "tests/methods/test_devices.py", "--tests-select", "ept"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "## Routed generation" in out.with_suffix(".md").read_text()

    assert result["mode"] == "quick" and result["device"] == "cpu" and result["dtype"] == "bf16"
    assert [(r["d_in"], r["d_out"]) for r in result["layers"]] == [(256, 256), (256, 688)]  # 4096 and 11008 / 16
    for layer in result["layers"]:
        assert set(layer["variants"]) == {"lora", "ept_one_task", "ept_mixed_tasks"}
        for row in layer["variants"].values():
            assert positive(row["median"]) and row["n"] == 2 and positive(row["vs_lora"])
        assert layer["variants"]["lora"]["vs_lora"] == 1.0

    training = result["training"]
    assert set(training) == {"lora", "ept"}
    for row in training.values():
        assert positive(row["median"]) and positive(row["vs_lora"]) and positive(row["trainable_params"])
        assert row["step_peak_mib"] is None  # the CPU allocator reports no peaks
    generation = result["generation"]["variants"]
    assert set(generation) == {"base", "lora", "ept"}
    assert all(positive(row["tokens_per_s"]) and positive(row["vs_lora"]) for row in generation.values())

    tests = result["device_tests"]
    assert tests["returncode"] == 0 and "1 passed" in tests["summary"], tests
