"""The export's model card: its snippet, run as written, reproduces the run's score; the base model is named as a
user elsewhere finds it; the max_rank table's errors are the ones export_lora reports."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from conftest import TINY_EXPERIMENT_MODELS
from pyramid_peft import export_lora
from pyramid_peft.merge import task_factors
from pyramid_peft.models import minilm_path
from pyramid_peft.training import train
from pyramid_peft.training.config import from_dict
from pyramid_peft.training.export import export_run
from pyramid_peft.training.loading import load_run
from pyramid_peft.training.model_card import HUB_IDS, base_model_id, truncation_error


@pytest.fixture
def tiny_run(tiny_experiment, tmp_path):
    """A finished EPT run on a tiny random BERT saved as a local pretrained folder (so the card can load it)."""
    base = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(**{**TINY_EXPERIMENT_MODELS["encoder"], "vocab_size": 30522})).save_pretrained(base)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(base)
    raw = tiny_experiment("encoder", "ept", tasks=("rte", "stsb"), max_steps=4, save_strategy="no")
    raw["model"] = {"name": str(base)}
    train(from_dict(raw))
    return tmp_path / "run", base


def card_code(card: str) -> str:
    return re.search(r"## Loading and scoring.*?```python\n(.*?)```", card, re.S).group(1)


def run_snippet(code: str) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "model-card-snippet", "exec"), {})
    return ast.literal_eval(printed.getvalue().strip())


@pytest.mark.parametrize("task", ["stsb", "rte"])
def test_the_card_snippet_run_as_written_reproduces_the_runs_score(tiny_run, task):
    run, base = tiny_run
    out = export_run(run, task, "lora")
    card = (out / "README.md").read_text()
    expected = json.loads((run / "metrics.json").read_text())["tasks"][task]["metrics"]
    printed = run_snippet(card_code(card))
    assert printed.keys() == expected.keys()
    for name, value in expected.items():
        assert printed[name] == pytest.approx(value, abs=1e-3), name
    assert f"base model: `{base}`" in card and "non-pad tokens" in card
    exported_rank = json.loads((out / "adapter_config.json").read_text())["r"]
    assert f"rank r = 2; as exported, LoRA rank up to {exported_rank} per layer" in card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)


def test_merged_export_card_snippet_also_reproduces_the_score(tiny_run):
    run, _ = tiny_run
    out = export_run(run, "stsb", "merged")
    expected = json.loads((run / "metrics.json").read_text())["tasks"]["stsb"]["metrics"]
    printed = run_snippet(card_code((out / "README.md").read_text()))
    assert printed["pearson"] == pytest.approx(expected["pearson"], abs=1e-3)


def test_max_rank_errors_match_what_export_lora_measures(tiny_run, tmp_path):
    run, _ = tiny_run
    experiment = load_run(run)
    factors = task_factors(experiment.peft_model, 1)
    exact = max(up.shape[1] for up, _ in factors.values())
    for rank in (1, 2, exact):
        report = export_lora(experiment.peft_model, 1, tmp_path / f"r{rank}", max_rank=rank if rank < exact else None)
        params, error, worst = truncation_error(factors, rank)
        assert error == pytest.approx(report["relative_error"], rel=1e-9, abs=1e-12)
        assert worst == pytest.approx(report["worst_layer_relative_error"], rel=1e-9, abs=1e-12)
        state_numel = sum(
            up.shape[0] * min(rank, up.shape[1]) + down.shape[1] * min(rank, up.shape[1])
            for up, down in factors.values()
        )
        assert params == state_numel
    assert truncation_error(factors, 1)[1] > 0  # rank-1 truncation of a rank >= 2 change loses something
    card = (export_run(run, "stsb", "lora") / "README.md").read_text()
    assert "max_rank" in card and f"| {exact} (exact, as exported) |" in card


def test_an_alias_is_named_by_its_hub_id_never_by_its_local_folder():
    assert base_model_id("minilm-l6") == HUB_IDS["minilm-l6"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("google-t5/t5-base") == "google-t5/t5-base"
    assert "site-packages" not in base_model_id("minilm-l6")
