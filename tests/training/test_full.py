"""Full fine-tuning through the pipeline: every weight trains, saves, resumes, reloads and exports as a whole model."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyramid_peft.training import RunError, build_experiment, evaluate_run, export_run, train
from pyramid_peft.training.config import ConfigError, from_dict
from pyramid_peft.training.full import full_parameter_count, load_full_weights
from pyramid_peft.training.run import build_trainer


def full_experiment(tiny_experiment, family="encoder", **training):
    raw = tiny_experiment(family, **training)
    raw["method"] = {"name": "full"}
    return raw


def test_every_weight_of_the_encoder_and_the_heads_trains(tiny_experiment):
    trainer = build_trainer(from_dict(full_experiment(tiny_experiment, max_steps=2)))
    encoder = trainer.model.encoder
    assert all(p.requires_grad for p in trainer.model.parameters())
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    trainer.train()
    changed = [n for n, p in encoder.named_parameters() if not torch.equal(p, before[n])]
    # Every weight the batches reach moves (the pooler and unused position rows do not feed the mean-pooled heads).
    assert {n for n in before if "attention" in n or "intermediate" in n} <= set(changed)


def test_run_folder_holds_the_whole_encoder_and_reloads_to_the_same_metrics(tiny_experiment):
    raw = full_experiment(tiny_experiment, max_steps=2)
    results = train(from_dict(raw))
    weights = Path(raw["training"]["output_dir"]) / "adapter"
    assert {"model.safetensors", "config.json", "heads.safetensors"} <= {p.name for p in weights.iterdir()}
    assert not (weights / "adapter_config.json").exists()
    assert evaluate_run(raw["training"]["output_dir"])["tasks"] == results["tasks"]


def test_resume_from_checkpoint_equals_the_straight_run(tiny_experiment, tmp_path):
    raw = full_experiment(tiny_experiment, max_steps=4)
    train(from_dict(raw))
    resumed = full_experiment(
        tiny_experiment,
        max_steps=4,
        output_dir=str(tmp_path / "resumed"),
        resume_from_checkpoint=str(Path(raw["training"]["output_dir"]) / "checkpoint-2"),
    )
    train(from_dict(resumed))
    straight = load_file(Path(raw["training"]["output_dir"]) / "adapter" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "adapter" / "model.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key])


def test_causal_model_with_tied_embeddings_round_trips(tiny_experiment):
    raw = full_experiment(tiny_experiment, "causal", tasks=("boolq",), max_steps=2)
    raw["model"]["config"]["tie_word_embeddings"] = True
    results = train(from_dict(raw))
    assert evaluate_run(raw["training"]["output_dir"])["tasks"] == results["tasks"]

    model = build_experiment(from_dict(raw), random_init=True).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    load_full_weights(model, Path(raw["training"]["output_dir"]) / "adapter")
    saved = load_file(Path(raw["training"]["output_dir"]) / "adapter" / "model.safetensors")
    torch.testing.assert_close(model.lm_head.weight, saved["model.embed_tokens.weight"], rtol=0, atol=0)


def test_export_gives_the_model_itself_and_refuses_lora(tiny_experiment, tmp_path):
    raw = full_experiment(tiny_experiment, max_steps=1)
    train(from_dict(raw))
    run = raw["training"]["output_dir"]
    with pytest.raises(RunError, match="no adapter to export as LoRA. Use --merged for"):
        export_run(run, "rte", "lora")
    out = export_run(run, "rte", "merged", tmp_path / "merged")
    exported = load_file(out / "model.safetensors")
    trained = load_file(Path(run) / "adapter" / "model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert (out / "head.safetensors").is_file()


def test_weights_of_another_model_or_an_adapter_folder_are_refused(tiny_experiment, tmp_path):
    raw = full_experiment(tiny_experiment, max_steps=1)
    train(from_dict(raw))
    wider = full_experiment(tiny_experiment, max_steps=1, output_dir=str(tmp_path / "wider"))
    wider["model"]["config"]["intermediate_size"] = 96
    model = build_experiment(from_dict(wider), random_init=True).model.encoder
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_full_weights(model, Path(raw["training"]["output_dir"]) / "adapter")

    lora = tiny_experiment("encoder", method="lora", max_steps=1, output_dir=str(tmp_path / "lora"))
    train(from_dict(lora))
    with pytest.raises(ValueError, match="no model.*safetensors.*adapter_model.safetensors"):
        load_full_weights(model, tmp_path / "lora" / "adapter")


def test_method_options_are_refused_by_name(tiny_experiment):
    raw = full_experiment(tiny_experiment)
    raw["method"]["r"] = 8
    with pytest.raises(ConfigError, match=r"takes no options, got \['r'\]"):
        build_experiment(from_dict(raw), random_init=True)


def test_parameter_count_is_every_trainable_weight_over_the_tasks(tiny_experiment):
    experiment = build_experiment(
        from_dict(full_experiment(tiny_experiment, tasks=("rte", "stsb", "sst2"))), random_init=True
    )
    encoder = experiment.peft_model
    total = sum(p.numel() for p in encoder.parameters())
    counts = full_parameter_count(encoder, num_tasks=3)
    assert counts["total"] == total and counts["per_task"] == counts["per_task_without_router"] == total / 3
    encoder.embeddings.requires_grad_(False)
    assert full_parameter_count(encoder, 3)["total"] == total - sum(p.numel() for p in encoder.embeddings.parameters())
