"""The example configs under configs/examples/ run as their headers say (briefly: one step, a few rows)."""

import json
from pathlib import Path

import pytest

from pyramid_peft.cli import main
from pyramid_peft.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
OWN_TASKS = REPO / "configs" / "examples" / "own-tasks.yaml"


def table_rows(printed: str, tasks: list[str]) -> dict[str, str]:
    """The eval table's row of each task (the line that starts with its name)."""
    return {line.split()[0]: line for line in printed.splitlines() if line.split()[:1] and line.split()[0] in tasks}


@pytest.mark.slow
def test_own_tasks_trains_a_4bit_base_then_evaluates_every_task_against_its_floor_and_exports(
    ept_data_dir, tmp_path, capsys
):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gguf")
    config = load_config(OWN_TASKS)
    tasks = config.task_names
    kinds = {entry["kind"] for entry in config.tasks}
    assert kinds == {"generation", "classification", "regression"} and config.model.quantization["bits"] == 4
    run = tmp_path / "run"
    overrides = ["--max_steps", "1", "--output_dir", str(run), "--data.data_dir", str(ept_data_dir)]
    overrides += ["--per_device_train_batch_size", "2", "--data.max_eval_examples", "2", "--report_to", "none"]
    assert main(["train", str(OWN_TASKS), *overrides]) == 0
    assert main(["eval", str(run), "--baseline"]) == 0  # the untrained model's scores: the generation task's floor
    capsys.readouterr()
    assert main(["eval", str(run), "--output", str(tmp_path / "eval.json")]) == 0
    rows = table_rows(capsys.readouterr().out, tasks)
    results = json.loads((tmp_path / "eval.json").read_text())["tasks"]
    assert set(rows) == set(results) == set(tasks)
    for entry in config.tasks:
        name, first_metric = entry["name"], entry["metrics"][0]
        assert first_metric in results[name]["metrics"] and f"{first_metric} " in rows[name]
        floor = results[name]["floor"]
        assert isinstance(floor, float) and f"{floor:.2f}" in rows[name]  # every kind has one, generation included
    assert main(["export", str(run), "--task", "arc_answer", "--lora"]) == 0
    assert (run / "export" / "arc_answer-lora" / "adapter_model.safetensors").is_file()
