"""Reliability: atomic checkpoints and safe resume, clear errors for bad input, safe loading, determinism.

The subprocess tests (a real SIGKILL / SIGTERM of ``ept train``, two processes under ``accelerate launch``) are in
``test_reliability_slow.py``. Bad-input cases already tested elsewhere are named where they belong below.
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from pyramid_peft.cli import main
from pyramid_peft.data import DataSourceError, load_examples
from pyramid_peft.training import RunError, build_experiment, load_run, train
from pyramid_peft.training.checkpoints import (
    MANIFEST_FILE,
    SAMPLER_STATE_FILE,
    STAGING_DIR,
    CheckpointError,
    CheckpointWarning,
    checkpoint_problem,
    resolve_resume,
    write_manifest,
)
from pyramid_peft.training.config import ConfigError, ModelSection, from_dict
from pyramid_peft.training.guards import NonFiniteLossError, StopSignals, TrainingInterrupted
from pyramid_peft.training.loading import load_trained
from pyramid_peft.training.run import _check_processes, build_trainer
from pyramid_peft.training.trainer import MultiTaskTrainer

SRC = Path(__file__).resolve().parents[1] / "src"
ADAPTER = "adapter_model.safetensors"
# Python lets only the main thread handle signals; elsewhere a test's SIGTERM would kill the test process.
main_thread_only = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signal handlers need the main thread"
)


def write_config(raw: dict, folder: Path) -> Path:
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# 1. Interruption: atomic checkpoints, detection of bad ones, resume, signals ------------------------------------


def fake_checkpoint(run: Path, step: int) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / ADAPTER).write_bytes(bytes(range(200)))
    (folder / "trainer_state.json").write_text("{}")
    write_manifest(folder, step)
    return folder


def test_partial_and_corrupt_checkpoints_are_named_and_skipped_for_the_previous_good_one(tmp_path):
    good, newest = fake_checkpoint(tmp_path, 2), fake_checkpoint(tmp_path, 4)
    assert checkpoint_problem(good) is None and resolve_resume(True, tmp_path) == str(newest)

    with open(newest / ADAPTER, "r+b") as handle:  # same size, one byte changed
        handle.write(b"\xff")
    assert "does not match its SHA-256" in checkpoint_problem(newest)
    (newest / ADAPTER).write_bytes(b"cut")
    assert "has 3 bytes instead of 200 (truncated" in checkpoint_problem(newest)
    (newest / MANIFEST_FILE).unlink()
    assert "no checkpoint_manifest.json, so its save never finished" in checkpoint_problem(newest)

    for request in (True, str(newest)):  # the newest, or that one by name: the previous good one is used
        with pytest.warns(CheckpointWarning, match=r"checkpoint-4 is unusable: .* Resuming from .*checkpoint-2"):
            assert resolve_resume(request, tmp_path) == str(good)

    (good / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"no valid checkpoint .*checkpoint-2: trainer_state.json is missing"):
        resolve_resume(True, tmp_path)
    with pytest.raises(CheckpointError, match="holds no checkpoint-<step> folder"):
        resolve_resume(True, tmp_path / "elsewhere")
    assert resolve_resume(None, tmp_path) is None


def test_checkpoints_hold_the_whole_training_state_and_appear_only_complete(tiny_experiment, monkeypatch):
    raw = tiny_experiment("seq2seq", max_steps=4, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)
    run = Path(raw["training"]["output_dir"])

    def fail_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise OSError("disk full")  # stands in for a kill in the middle of writing the checkpoint
        return original(self, output_dir)

    original = MultiTaskTrainer._save_rng_state
    monkeypatch.setattr(MultiTaskTrainer, "_save_rng_state", fail_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        train(from_dict(raw))
    names = {p.name for p in (run / "checkpoint-2").iterdir()}
    assert {
        ADAPTER,
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        SAMPLER_STATE_FILE,
        MANIFEST_FILE,
    } <= names
    assert checkpoint_problem(run / "checkpoint-2") is None
    assert json.loads((run / "checkpoint-2" / SAMPLER_STATE_FILE).read_text())["step"] == 2
    assert not (run / "checkpoint-4").exists() and (run / STAGING_DIR / "checkpoint-4").is_dir()
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()

    monkeypatch.setattr(MultiTaskTrainer, "_save_rng_state", original)
    train(from_dict({**raw, "training": {**raw["training"], "resume_from_checkpoint": True}}))
    assert checkpoint_problem(run / "checkpoint-4") is None and not (run / STAGING_DIR).exists()
    best = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert best in (str(run / "checkpoint-2"), str(run / "checkpoint-4"))  # the published name, not the staging one


def test_resuming_past_a_corrupt_checkpoint_replays_the_sampler_and_matches_the_straight_run(tiny_experiment, tmp_path):
    raw = tiny_experiment("seq2seq", max_steps=4)
    run = Path(raw["training"]["output_dir"])
    train(from_dict(raw))
    straight = tmp_path / "straight.safetensors"
    shutil.copy(run / "adapter" / ADAPTER, straight)
    with open(run / "checkpoint-4" / "optimizer.pt", "r+b") as handle:
        handle.truncate(100)

    trainer = build_trainer(from_dict(raw))
    collated = []
    collate = trainer.data_collator
    trainer.data_collator = lambda features: collated.append(len(features)) or collate(features)
    with pytest.warns(CheckpointWarning, match=r"checkpoint-4 is unusable: optimizer.pt has 100 bytes"):
        trainer.train(resume_from_checkpoint=True)
    assert len(collated) == 2  # steps 3 and 4: the two steps skipped on resume were never collated
    assert_same_weights(run / "checkpoint-4" / ADAPTER, straight)
    assert checkpoint_problem(run / "checkpoint-4") is None  # rewritten whole


def test_resuming_with_other_sampling_settings_is_refused(tiny_experiment, tmp_path):
    raw = tiny_experiment("seq2seq", max_steps=2)
    train(from_dict(raw))
    checkpoint = Path(raw["training"]["output_dir"]) / "checkpoint-2"  # a finished run: continued in a new folder
    raw["training"].update(
        output_dir=str(tmp_path / "next"), resume_from_checkpoint=str(checkpoint), per_device_train_batch_size=2
    )
    with pytest.raises(CheckpointError, match=r"checkpoint-2 was trained under another config: .*batch_size: was 4"):
        train(from_dict(raw))
    # past the config guard (--allow_config_change), the sampler still cannot replay another batch size
    with pytest.raises(CheckpointError, match=r"checkpoint-2: .*'batch_size': 4.*original tasks, batch size"):
        train(from_dict(raw), allow_config_change=True)


@contextmanager
def sigint_handled_by(handler):
    """SIGINT's disposition set to ``handler`` while open, and restored after."""
    original = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, original)


@pytest.fixture
def terminal_ctrl_c():
    """Python's own Ctrl-C handler, as at a terminal (a test run started in the background ignores SIGINT)."""
    with sigint_handled_by(signal.default_int_handler):
        yield


@main_thread_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_sigterm_and_ctrl_c_save_a_checkpoint_then_stop(tiny_experiment, signum, terminal_ctrl_c):
    raw = tiny_experiment("seq2seq", max_steps=8, save_steps=100)
    trainer = build_trainer(from_dict(raw))

    class SignalAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signum)

    trainer.add_callback(SignalAtStep2())
    previous = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.train()
    checkpoint = Path(raw["training"]["output_dir"]) / "checkpoint-3"  # the step during which the flag was seen
    assert stop.value.signum == signum and stop.value.checkpoint == checkpoint
    assert checkpoint_problem(checkpoint) is None and trainer.state.global_step == 3
    assert f"{signal.Signals(signum).name} stopped training at step 3" in str(stop.value)
    assert f"--resume_from_checkpoint {checkpoint}" in str(stop.value)
    assert signal.getsignal(signum) is previous


SECOND_CTRL_C = """
import signal, time
from pyramid_peft.training.guards import StopSignals

signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a background parent ignores SIGINT

def wait(condition):  # Python runs handlers at its next check points: short sleeps give it some
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)

with StopSignals() as signals:
    signal.raise_signal(signal.SIGINT)
    wait(lambda: signals.received is not None)
    print("first:", signals.received, flush=True)
    signal.raise_signal(signal.SIGINT)
    wait(lambda: False)
print("still running", flush=True)
"""


@main_thread_only
def test_a_second_stop_signal_runs_the_previous_handler_at_once(terminal_ctrl_c):
    """The second signal's handling calls the handler it replaced directly (Python's Ctrl-C handler raises
    KeyboardInterrupt inside it), rather than re-raising the signal for a later check point to handle."""
    with StopSignals() as signals:
        signals._handle(signal.SIGINT, None)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signals._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@main_thread_only
def test_a_stop_signal_the_process_ignores_stays_ignored():
    """A background job (``&``, ``nohup``) starts with SIGINT ignored: training leaves it so, and still stops
    gracefully on SIGTERM."""
    with sigint_handled_by(signal.SIG_IGN):
        with StopSignals() as signals:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == signals._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_second_ctrl_c_stops_at_once():
    """The first Ctrl-C only sets the flag; the second raises KeyboardInterrupt at once. In a fresh interpreter
    with Python's own Ctrl-C handler: signal dispositions are process-wide and inherited (a test run started in
    the background ignores SIGINT, and then so did the handler this replaces)."""
    done = subprocess.run(
        [sys.executable, "-c", SECOND_CTRL_C], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )
    assert f"first: {int(signal.SIGINT)}" in done.stdout, done.stderr[-2000:]
    assert "still running" not in done.stdout and done.returncode != 0
    assert "KeyboardInterrupt" in done.stderr


# 2. Bad input: the message names the problem and the fix -------------------------------------------------------
# Elsewhere: unknown task names (tasks/test_registry.py::test_unknown_task_lists_names_and_suggests), unknown method
# names and options (training/test_config.py::test_unknown_method_*), method config values
# (methods/test_ept_layer.py::test_config_errors_name_the_problem and each peer's test_config_errors), target modules
# that match nothing (test_registry.py::test_target_modules_that_match_nothing_are_named), data rows with a missing
# field or a label outside the task (data/test_sources.py::test_missing_field_names_file_and_line and
# ::test_label_outside_the_task_names_file_and_line), task ids out of range at forward time
# (test_routing.py::test_missing_and_out_of_range_task_ids_raise_clear_errors). Here: the same through `ept train`,
# and what had no check before.


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": ["rte", "sst-2"]}, r"Unknown task 'sst-2'.*Did you mean 'sst2'"),
        ({"method": {"name": "etp"}}, r"method.name='etp' is not one of: lora, ept, .*full. Did you mean 'ept'"),
        ({"method": {"kernel_sizes": [2, -4]}}, r"kernel_sizes must be positive integers, got \[-4\]"),
        ({"method": {"top_k": 3}}, r"top_k=3 must be between 1 and the number of experts \(2\)"),
        ({"method": {"num_tasks": 1}}, r"method.num_tasks=1 is smaller than the 2 tasks .* at least 2"),
        ({"method": {"target_modules": ["q_proj"]}}, r"not found in the base model.*named: .*query"),
        ({"method": {"name": "hydralora", "r": 40}}, r"r=40 is larger than .*\(32 -> 32\) allows.* r <= 32"),
        ({"method": {"r": 40}}, r"kernel sizes \[2, 4\] and r=40 do not fit.*smaller r"),
    ],
    ids=["task", "method", "kernel_sizes", "top_k", "num_tasks", "target_modules", "rank", "ept_rank"],
)
def test_bad_configs_stop_ept_train_with_a_message(tiny_experiment, tmp_path, capsys, change, message):
    raw = tiny_experiment("encoder")
    if "method" in change:
        name = change["method"].get("name", "ept")
        keep = {"name", "r", "target_modules"} if name != "ept" else set(raw["method"])
        raw["method"] = {**{k: v for k, v in raw["method"].items() if k in keep}, **change["method"]}
    else:
        raw.update(change)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(write_config(raw, tmp_path))])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err.replace("\n", " "))


@pytest.mark.parametrize("rows", ["", '{"idx": 0, "sentence1": "a", "sentence2": "b", "label": -1}\n'])
def test_an_empty_split_names_its_file(tmp_path, rows):
    path = tmp_path / "glue" / "rte" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(rows)
    with pytest.raises(DataSourceError, match=rf"{re.escape(str(path))}: rte split 'train' has no labelled examples"):
        load_examples("rte", "train", tmp_path)


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tiny_experiment, tmp_path, monkeypatch, capsys
):
    raw = tiny_experiment("seq2seq", max_steps=4)
    run = Path(raw["training"]["output_dir"])
    original = MultiTaskTrainer.compute_loss

    def nan_at_step_3(self, model, inputs, **kwargs):
        loss = original(self, model, inputs, **kwargs)
        return loss * float("nan") if self.state.global_step == 2 and model.training else loss

    monkeypatch.setattr(MultiTaskTrainer, "compute_loss", nan_at_step_3)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(write_config(raw, tmp_path))])
    err = capsys.readouterr().err.replace("\n", " ")
    assert exit_info.value.code == 2
    assert "the training loss is nan at step 3" in err
    assert f"last good checkpoint (finite weights and losses) is {run / 'checkpoint-2'}" in err
    assert checkpoint_problem(run / "checkpoint-2") is None
    assert not (run / "checkpoint-4").exists() and not (run / "adapter").exists()

    trainer = build_trainer(from_dict(raw))
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    assert error.value.step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the NaN step updated nothing


def test_adapter_folders_of_another_method_or_base_model_are_refused(tiny_experiment, tmp_path):
    ept_raw = tiny_experiment("encoder", max_steps=2)
    ept_run = Path(ept_raw["training"]["output_dir"])
    train(from_dict(ept_raw))

    lora = build_experiment(from_dict(tiny_experiment("encoder", method="lora"))).model
    with pytest.raises(RunError, match=r"holds a EPT adapter, but this run's config builds LORA"):
        load_trained(lora, ept_run / "checkpoint-2")

    ept_raw["model"]["config"].update(hidden_size=48, intermediate_size=96)
    wider = build_experiment(from_dict(ept_raw)).model
    with pytest.raises(RunError, match=r"does not fit this run's model.*another base model.*size mismatch"):
        load_trained(wider, ept_run / "checkpoint-2")

    renamed = tmp_path / "renamed"
    shutil.copytree(ept_run / "adapter", renamed)
    config = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/t5-base"}))
    with pytest.raises(RunError, match=r"trained on base model 't5-base', but this run's model is '\(built from"):
        load_trained(load_run(ept_run).model, renamed)

    (ept_run / "checkpoint-2" / MANIFEST_FILE).unlink()
    with pytest.raises(RunError, match=r"checkpoint-2 is unusable: it has no checkpoint_manifest.json"):
        load_run(ept_run, checkpoint=str(ept_run / "checkpoint-2"))


# 3. Safe loading ------------------------------------------------------------------------------------------------


def test_the_source_never_unpickles_and_never_trusts_remote_code_by_itself():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M), path
        assert "trust_remote_code=True" not in text, path
    assert ModelSection().trust_remote_code is False
    assert from_dict({"tasks": ["rte"]}).model.trust_remote_code is False


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resuming_refuses_a_pickle_that_runs_code(tiny_experiment, tmp_path):
    trainer = build_trainer(from_dict(tiny_experiment("seq2seq")))
    marker = tmp_path / "code-ran"
    torch.save({"python": _Payload(marker)}, tmp_path / "rng_state.pth")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer._load_rng_state(str(tmp_path))  # the stock resume path: torch.load(weights_only=True)
    assert not marker.exists()


# 4. Distributed: the two-process run is in test_reliability_slow.py ----------------------------------------------


def test_a_multi_process_launch_that_the_trainer_would_not_join_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 processes were launched but the Trainer runs each alone.*--use_cpu"):
        _check_processes(SimpleNamespace(world_size=1))
    _check_processes(SimpleNamespace(world_size=2))


# 5. Determinism -------------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_run_twice(tiny_experiment, tmp_path):
    runs = []
    for name in ("first", "second"):
        raw = tiny_experiment("encoder", max_steps=4, output_dir=str(tmp_path / name))
        train(from_dict(raw))
        runs.append(tmp_path / name)
    first, second = ((run / "metrics.json").read_text() for run in runs)
    assert first == second and json.loads(first)["tasks"]["stsb"]["metrics"]["pearson"] != 0
    assert_same_weights(runs[0] / "adapter" / ADAPTER, runs[1] / "adapter" / ADAPTER)
    losses = [
        [
            e["loss"]
            for e in json.loads((r / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
            if "loss" in e
        ]
        for r in runs
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4
