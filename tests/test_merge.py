"""Per-task merge and plain-LoRA export reproduce the routed model (float32, max abs error <= 1e-5)."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from conftest import TINY_BUILDERS, TINY_TARGETS, tiny_batch
from pyramid_peft import EptConfig, MultiLoraConfig, NotMergeableError, export_lora, merge_for_task

KEY = {"t5": "logits", "llama": "logits", "bert": "last_hidden_state"}


def routed_model(family, **overrides):
    settings = dict(
        target_modules=TINY_TARGETS[family], num_tasks=3, r=4, kernel_sizes=[2, 2, 4, 4, 6, 6, 8, 8], lora_dropout=0.0
    )
    settings.update(overrides)
    model = get_peft_model(TINY_BUILDERS[family](), EptConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * (0.2 if "kernels" in name else 0.05))
    return model.eval()


@pytest.mark.parametrize("form", ["kron2d", "code1d"])
def test_merge_for_task_reproduces_routed_outputs(family, form):
    model = routed_model(family, expert_form=form)
    batch = tiny_batch(family)
    for task in range(3):
        routed = model(**batch, task_ids=torch.full((4,), task))[KEY[family]]
        merged = merge_for_task(model, task)
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert (merged(**batch)[KEY[family]] - routed).abs().max() <= 1e-5
    again = model(**batch, task_ids=torch.zeros(4, dtype=torch.long))[KEY[family]]  # the routed model is untouched
    assert torch.isfinite(again).all()


@pytest.mark.parametrize("form", ["kron2d", "code1d"])
def test_export_lora_loads_in_stock_peft_and_reproduces_outputs(tmp_path, family, form):
    model = routed_model(family, expert_form=form)
    batch = tiny_batch(family)
    task = 1
    routed = model(**batch, task_ids=torch.full((4,), task))[KEY[family]]
    report = export_lora(model, task, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(TINY_BUILDERS[family](), tmp_path / "lora").eval()
    assert any(isinstance(m, LoraLayer) for m in lora.modules())
    assert (lora(**batch)[KEY[family]] - routed).abs().max() <= 1e-5
    # rank = r * (sum of the chosen experts' distinct kernel sizes) for kron2d, r per kernel size for code1d
    assert report["max_layer_rank"] <= (4 * (8 + 6) if form == "kron2d" else 4 * 2)


def test_export_with_max_rank_reports_the_truncation_error(tmp_path):
    model = routed_model("t5")
    full = export_lora(model, 0, tmp_path / "full")
    assert full["relative_error"] == 0.0
    small = export_lora(model, 0, tmp_path / "small", max_rank=2)
    assert small["max_layer_rank"] == 2 and 0 < small["relative_error"] < 1
    assert json.loads((tmp_path / "small" / "export_report.json").read_text()) == small


def test_token_routing_cannot_be_merged_or_exported(tmp_path):
    model = routed_model("bert", router_input="token")
    with pytest.raises(NotMergeableError, match="router_input='task'"):
        merge_for_task(model, 0)
    with pytest.raises(NotMergeableError):
        export_lora(model, 0, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_merge_and_unload_of_a_task_routed_method_asks_for_the_task():
    model = routed_model("t5")
    with pytest.raises(NotMergeableError, match=r"name the task to merge, model.merge_and_unload\(task_id=t\)"):
        model.merge_and_unload()
    assert model.base_model.routed_layers()  # refused before any layer was touched


def test_merge_rejects_task_ids_out_of_range():
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        merge_for_task(routed_model("t5"), 3)


def _trained_run(tiny_experiment, tmp_path, method):
    """A two-step run of a tiny T5 with ``method``, trained through the ``ept train`` command."""
    import yaml

    from pyramid_peft.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment("seq2seq", method=method, tasks=("rte", "sst2"))))
    assert main(["train", str(path), "--max_steps", "2"]) == 0
    return tmp_path / "run"


def test_multilora_run_exports_merged_and_as_a_stock_lora_folder(tiny_experiment, tmp_path):
    """MultiLoRA has no routing: ``ept export --merged`` and ``--lora`` both work, and stock PEFT loads the LoRA."""
    from transformers import AutoModelForSeq2SeqLM

    from pyramid_peft.training.export import export_run
    from pyramid_peft.training.loading import load_run

    run = _trained_run(tiny_experiment, tmp_path, "multilora")
    merged_dir = export_run(run, "sst2", "merged", tmp_path / "merged")
    lora_dir = export_run(run, "sst2", "lora")
    assert json.loads((lora_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    experiment = load_run(run)
    batch = {"input_ids": torch.tensor([[5, 900, 1200, 102]]), "decoder_input_ids": torch.tensor([[0, 7]])}
    routed = experiment.model(**batch).logits
    merged = AutoModelForSeq2SeqLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(merged(**batch).logits, routed, atol=1e-5, rtol=1e-4)
    base = experiment.peft_model.unload()
    assert not torch.allclose(base(**batch).logits, routed)
    stock = PeftModel.from_pretrained(base, lora_dir).eval()
    assert isinstance(stock.base_model.model.encoder.block[0].layer[0].SelfAttention.q, LoraLayer)
    torch.testing.assert_close(stock(**batch).logits, routed, atol=1e-5, rtol=1e-4)


def test_an_unmergeable_run_is_refused_before_anything_is_written(tiny_experiment, tmp_path):
    from pyramid_peft.training.export import export_run

    run = _trained_run(tiny_experiment, tmp_path, "hydralora")
    for mode in ("merged", "lora"):
        with pytest.raises(NotMergeableError, match="HydraLoRA cannot be merged.*per token"):
            export_run(run, "sst2", mode, tmp_path / mode)
        assert not (tmp_path / mode).exists()


def test_merging_in_place_into_a_quantized_base_is_refused_naming_it():
    bnb = pytest.importorskip("bitsandbytes")

    class Quantized(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(16, 16, bias=False, compute_dtype=torch.float32).to("cpu")

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Quantized(), MultiLoraConfig(target_modules=["proj"], r=2))
    before = model.base_model.model.proj.get_base_layer().weight.clone()
    with pytest.raises(NotMergeableError, match=r"proj: the base weight is quantized \(torch.uint8\)"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.proj.get_base_layer().weight, before)
