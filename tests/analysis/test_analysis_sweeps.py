"""Sweep configs (Tables 1, 4, 5) resolve into valid experiments; results summarize into the paper's layouts."""

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import BertConfig, BertModel

from pyramid_peft.analysis.sweeps import load_sweep, result_record, summarize
from pyramid_peft.cli import main
from pyramid_peft.training.experiment import peft_config

SWEEPS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
PAPER_ORDER = ["mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "rte", "cola"]


def minilm_shaped_on_meta() -> BertModel:
    """One block of all-MiniLM-L6-v2's shapes (the quickstart model), without weights."""
    with torch.device("meta"):
        config = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=12)
        return BertModel(config)


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_variant_builds(path):
    sweep = load_sweep(path)
    runs = sweep.runs()
    assert len({config.training["output_dir"] for _, _, config in runs}) == len(runs)
    for _, _, config in runs:
        with torch.device("meta"):
            get_peft_model(minilm_shaped_on_meta(), peft_config(config, "encoder", len(config.tasks)))


def test_table4_is_the_pyramid_against_single_kernel_sizes():
    sweep = load_sweep(SWEEPS / "table4-pyramid.yaml")
    kernels = {v: sweep.config(v).method.options["kernel_sizes"] for v in sweep.variants}
    assert kernels == {f"EPT-{k}": [k] * 8 for k in (2, 4, 6, 8)} | {"EPT-2468": [2, 2, 4, 4, 6, 6, 8, 8]}
    assert sweep.table.tasks == PAPER_ORDER


def test_table5_is_the_full_ablation_grid_with_matching_marks():
    sweep = load_sweep(SWEEPS / "table5-ablation.yaml")
    mark = {True: "✓", False: "✗"}
    grid = set()
    for variant in sweep.variants:
        options = sweep.config(variant).method.options
        on = (options["factor_init"] == "gaussian", options["top_k"] == 2, options["alp"])
        assert sweep.cells[variant] == [mark[x] for x in on]
        grid.add(on)
    assert len(grid) == 8 and sweep.table.columns == ["AB init", "Top-K", "ALP"]


def test_table1_sweeps_lora_rank_with_a_constant_scale():
    sweep = load_sweep(SWEEPS / "table1-lora-rank.yaml")
    configs = [sweep.config(v) for v in sweep.variants]
    assert [c.method.options["r"] for c in configs] == [1, 2, 4, 8, 16, 32]
    assert all(c.method.name == "lora" and c.method.options["lora_alpha"] == 4 * c.method.options["r"] for c in configs)
    assert all(c.tasks == ["mrpc", "rte", "sst2", "cola"] for c in configs)


def record(variant: str, seed: int, scores: dict) -> dict:
    """A result record as the quality benchmark writes it, from run results."""
    results = {
        "method": "ept",
        "tasks": {
            t: {"split": "validation", "num_examples": 10, "metrics": {"accuracy": v, "paper": v}}
            for t, v in scores.items()
        },
        "paper_average": sum(scores.values()) / len(scores),
        "full_average": 0.0,
    }
    return result_record(variant, seed, results, params={"per_task_without_router": 405_504})


def write(tmp_path, records: list[dict]) -> Path:
    folder = tmp_path / "results"
    folder.mkdir(exist_ok=True)
    for r in records:
        (folder / f"{r['variant']}-{r['seed']}.json").write_text(json.dumps(r))
    return folder


def test_ablation_summary_has_the_paper_layout(tmp_path):
    scores = dict.fromkeys(PAPER_ORDER, 80.0)
    folder = write(
        tmp_path,
        [
            record("abinit1-topk1-alp1", 1, {**scores, "rte": 82.0}),
            record("abinit1-topk1-alp1", 2, {**scores, "rte": 84.0}),
            record("abinit0-topk0-alp0", 1, {**scores, "rte": 70.0}),
            record("abinit0-topk0-alp1", 1, {**scores, "rte": 75.0}),
        ],
    )
    table = summarize([folder], SWEEPS / "table5-ablation.yaml").splitlines()
    assert table[0].startswith("### Table 5")
    assert table[2] == "| AB init | Top-K | ALP | MNLI | QQP | QNLI | SST-2 | STS-B | MRPC | RTE | CoLA | AVG |"
    assert table[4].startswith("| ✗ | ✗ | ✗ | **80.0** |")  # sweep order, not file order; ties share the bold
    assert "| 70.0 |" in table[4]
    assert table[5].startswith("| ✗ | ✗ | ✓ |") and "| *75.0* |" in table[5]  # second best in italics
    assert table[6].startswith("| ✓ | ✓ | ✓ |") and "| **83.0±1.41** |" in table[6]  # mean ± std over seeds
    assert "1-2 per row" in table[-1]


def test_a_params_column_in_the_papers_units(tmp_path):
    folder = write(tmp_path, [record("EPT-2", 0, {"rte": 80.0}), record("EPT-4", 0, {"rte": 81.0})])
    sweep = load_sweep(SWEEPS / "table4-pyramid.yaml")
    sweep.table.params = "per_task_without_router"
    table = summarize([folder], sweep)
    assert "| Methods | params/task | MNLI |" in table and "| EPT-2 | 0.41M | – |" in table


def test_summary_without_a_sweep_and_from_the_command_line(tmp_path, capsys):
    folder = write(tmp_path, [record("a", 0, {"rte": 60.0, "cola": 40.0}), record("b", 0, {"rte": 70.0})])
    table = summarize(sorted(folder.glob("*.json")))
    assert "| Methods | RTE | CoLA | AVG |" in table
    assert "| b | **70.0** | – | **70.0** |" in table  # a missing task is a dash
    out = tmp_path / "table.md"
    assert main(["analyze", "sweep", str(folder), "--output", str(out)]) == 0
    assert out.read_text() == table
    assert main(["analyze", "sweep", str(folder / "a-0.json")]) == 0
    assert "| a | 60.0 | 40.0 | 50.0 |" in capsys.readouterr().out  # one row: nothing ranked


def test_bad_inputs_fail_clearly(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"variant": "x"}))
    with pytest.raises(ValueError, match="not sweep result files"):
        summarize([tmp_path / "bad.json"])
    (tmp_path / "sweep.yaml").write_text("base: ../x.yaml\n")
    with pytest.raises(ValueError, match="needs 'base' and 'variants'"):
        load_sweep(tmp_path / "sweep.yaml")
    (tmp_path / "base.yaml").write_text("method: {name: ept}\n")
    (tmp_path / "cells.yaml").write_text("base: base.yaml\ntable: {columns: [A, B]}\nvariants: {v: {columns: [x]}}\n")
    with pytest.raises(ValueError, match="one 'columns' cell per table column"):
        load_sweep(tmp_path / "cells.yaml")
