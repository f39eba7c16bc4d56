"""Reliability, issue 14: a run folder never lies and is never lost; the CLI's errors are short, with exit 2.

Each test reproduces one case of the issue through ``ept`` (``pyramid_peft.cli.main``) on a tiny random model.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pyramid_peft import NotMergeableError
from pyramid_peft.cli import main
from pyramid_peft.training import ConfigError, evaluate_run, train
from pyramid_peft.training.checkpoints import newest_sound_checkpoint, write_manifest
from pyramid_peft.training.config import from_dict
from pyramid_peft.training.run import build_trainer

ADAPTER = "adapter_model.safetensors"


def write_config(raw: dict, folder: Path) -> Path:
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def exit_code_and_error(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def finished_run(tiny_experiment, tmp_path):
    """A finished tiny EPT run (encoder, RTE + STS-B, 2 steps, a checkpoint at step 2), its eval results and its
    files' hashes."""
    raw = tiny_experiment("encoder", max_steps=2)
    run = Path(raw["training"]["output_dir"])
    train(from_dict(raw))
    return raw, run, evaluate_run(run), snapshot(run)


def test_a_failed_rerun_into_a_finished_run_changes_nothing(finished_run, tmp_path, capsys):
    raw, run, results, files = finished_run
    export = ["export", str(run), "--task", "rte", "--lora", "--output"]
    assert main([*export, str(tmp_path / "before")]) == 0
    files = snapshot(run)
    rerun = ["train", str(run / "config.yaml"), "--method.top_k", "2", "--method.lora_alpha", "200"]
    code, err = exit_code_and_error([*rerun, "--learning_rate", "-1"], capsys)
    assert code == 2 and "training.learning_rate=-1 must be positive" in err and "Traceback" not in err
    code, err = exit_code_and_error(rerun, capsys)
    assert code == 2 and f"{run} holds a finished run" in err
    assert "new --output_dir" in err and "--overwrite" in err and f"--resume_from_checkpoint {run}/checkpoint-2" in err
    assert snapshot(run) == files and evaluate_run(run) == results
    assert main([*export, str(tmp_path / "after")]) == 0
    assert snapshot(tmp_path / "after") == snapshot(tmp_path / "before")
    assert json.loads((tmp_path / "after" / "adapter_config.json").read_text())["r"] in (2 * 2, 2 * 4)  # r x k


def test_eval_and_export_use_the_config_the_adapter_was_trained_with(finished_run, capsys):
    _, run, results, _ = finished_run
    record = yaml.safe_load((run / "config.yaml").read_text())
    record["method"].update(top_k=2, lora_alpha=200)  # a hand edit, or a rerun's half-written start
    (run / "config.yaml").write_text(yaml.safe_dump(record))
    assert evaluate_run(run) == results  # read from adapter/experiment.yaml, saved with the weights

    trained_with = yaml.safe_load((run / "adapter" / "experiment.yaml").read_text())
    trained_with["method"]["r"] = 4
    (run / "adapter" / "experiment.yaml").write_text(yaml.safe_dump(trained_with))
    write_manifest(run / "adapter", 2)  # a consistent folder whose config does not match its adapter
    code, err = exit_code_and_error(["eval", str(run)], capsys)
    assert code == 2 and "adapter_config.json does not match the config" in err and "r: adapter 2, config 4" in err
    assert "another base model" not in err


def test_overwrite_moves_the_finished_run_aside_and_a_killed_rerun_loses_nothing(
    finished_run, tiny_experiment, monkeypatch, capsys
):
    raw, run, results, files = finished_run

    def killed(*args, **kwargs):  # stands in for a kill -9 right after the rerun started
        raise KeyboardInterrupt

    monkeypatch.setattr("pyramid_peft.training.run._trainer", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(write_config(raw, run.parent)), "--overwrite"])
    moved = [p for p in run.parent.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and snapshot(moved[0]) == files
    assert {**evaluate_run(moved[0]), "weights": None} == {**results, "weights": None}
    assert f"moved the run that was in {run} to {moved[0]}" in capsys.readouterr().err
    assert not run.exists()
    monkeypatch.undo()
    assert main(["train", str(write_config(raw, run.parent)), "--overwrite"]) == 0  # nothing to move: trains
    assert (run / "config.yaml").is_file() and len(list(run.parent.glob("run.replaced-*"))) == 1


def test_an_unfinished_run_is_resumed_or_refused_and_the_resume_is_announced(tiny_experiment, monkeypatch, capsys):
    raw = tiny_experiment("seq2seq", max_steps=4)
    run = Path(raw["training"]["output_dir"])
    trainer = build_trainer(from_dict({**raw, "training": {**raw["training"], "max_steps": 2}}))
    trainer.train()  # leaves checkpoint-2, no adapter/ and no config.yaml: an interrupted run
    path = str(write_config(raw, run.parent))
    code, err = exit_code_and_error(["train", path], capsys)
    assert code == 2 and f"{run} holds an unfinished run: continue it with --resume_from_checkpoint" in err
    code, err = exit_code_and_error(["train", path, "--resume_from_checkpoint", "--overwrite"], capsys)
    assert code == 2 and "exclude each other" in err
    code, err = exit_code_and_error(["train", path, "--resume_from_checkpoint"], capsys)  # trained to 2 steps
    assert code == 2 and "training.max_steps: was 2, now 4" in err and "--allow_config_change" in err
    assert main(["train", path, "--resume_from_checkpoint", "--allow_config_change"]) == 0
    err = capsys.readouterr().err
    assert f"ept: resuming from {run / 'checkpoint-2'}" in err
    assert "under a changed config (--allow_config_change): training.max_steps: was 2, now 4" in err


def test_eval_of_the_final_adapter_folder_as_a_checkpoint_works(finished_run, capsys):
    _, run, results, _ = finished_run
    assert main(["eval", str(run), "--checkpoint", str(run / "adapter")]) == 0
    assert "paper average" in capsys.readouterr().out


@pytest.mark.parametrize("name", [ADAPTER, "heads.safetensors"])
def test_a_truncated_weights_file_is_named(finished_run, capsys, name):
    _, run, _, _ = finished_run
    with open(run / "adapter" / name, "r+b") as handle:
        handle.truncate(40)
    for argv in (["eval", str(run)], ["export", str(run), "--task", "rte", "--lora"]):
        code, err = exit_code_and_error(argv, capsys)
        assert code == 2 and f"{run / 'adapter'} is unusable: {name} has 40 bytes instead of" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def write_checkpoint(run: Path, step: int, weight: torch.Tensor, losses: list[float]) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": weight}, str(folder / ADAPTER))
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": x} for x in losses]}))
    write_manifest(folder, step)
    return folder


def test_the_last_good_checkpoint_has_finite_weights_and_losses(tmp_path):
    sound = write_checkpoint(tmp_path, 1, torch.ones(3), [1.0])
    write_checkpoint(tmp_path, 2, torch.tensor([1.0, float("inf"), 0.0]), [1.0, 2.0])  # exploded weights
    write_checkpoint(tmp_path, 3, torch.ones(3), [1.0, 2.0, float("nan")])  # a NaN loss logged before it
    assert newest_sound_checkpoint(tmp_path) == sound
    (sound / ADAPTER).write_bytes(b"cut")  # and an invalid one is never named
    assert newest_sound_checkpoint(tmp_path) is None


def test_a_non_finite_loss_names_a_checkpoint_whose_weights_are_finite(tiny_experiment, tmp_path, monkeypatch, capsys):
    raw = tiny_experiment("seq2seq", max_steps=6, save_steps=1)
    run = Path(raw["training"]["output_dir"])
    original = torch.optim.AdamW.step

    def explode_at_step_3(self, *args, **kwargs):  # the update of step 3 makes the weights infinite
        out = original(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 3:
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", explode_at_step_3)
    code, err = exit_code_and_error(["train", str(write_config(raw, tmp_path))], capsys)
    assert code == 2 and "at step 4" in err
    exploded = load_file(run / "checkpoint-3" / ADAPTER)  # complete and valid, but not a place to resume from
    assert not all(torch.isfinite(t).all() for t in exploded.values())
    assert f"last good checkpoint (finite weights and losses) is {run / 'checkpoint-2'}" in err.replace("\n", " ")


def test_not_mergeable_and_config_errors_are_one_line_with_exit_2_and_a_traceback_with_debug(
    tiny_experiment, tmp_path, monkeypatch, capsys
):
    raw = tiny_experiment("encoder", method="hydralora", max_steps=1)
    run = Path(raw["training"]["output_dir"])
    assert main(["train", str(write_config(raw, tmp_path))]) == 0
    capsys.readouterr()
    code, err = exit_code_and_error(["export", str(run), "--task", "rte", "--merged"], capsys)
    assert code == 2 and err.startswith("ept export: error:") and len(err.strip().splitlines()) <= 2
    assert "Traceback" not in err
    with pytest.raises(NotMergeableError):
        main(["export", str(run), "--task", "rte", "--merged", "--debug"])
    monkeypatch.setenv("EPT_DEBUG", "1")
    with pytest.raises(ConfigError, match="method.r='abc' is a str; expected int"):
        main(["train", str(write_config(raw, tmp_path)), "--method.r", "abc"])
