"""``benchmarks/learning_curve.py``: every evaluation's point reaches the curve's files as it happens, so a run that
dies mid-way (no chance to write at the end) still leaves the points it reached."""

import json

import pytest
from _scripts import import_benchmark
from transformers import TrainerCallback

from pyramid_peft.training.config import from_dict
from pyramid_peft.training.run import train


@pytest.fixture(scope="module")
def learning_curve():
    return import_benchmark("learning_curve")


class DieAfterFirstEvaluation(TrainerCallback):
    def on_evaluate(self, args, state, control, **kwargs):
        raise RuntimeError("killed")


def new_record() -> dict:
    return {"suite": "tiny", "variant": "lora", "learning_rate": 1e-3, "steps": 4, "points": [], "final": None,
            "stopped_at_step": None, "wall_seconds": None, "uptime_start": "", "uptime_end": None}  # fmt: skip


@pytest.mark.parametrize("dies", [False, True])
def test_each_evaluation_is_on_disk_when_it_happens(learning_curve, tiny_experiment, tmp_path, dies):
    config = from_dict(tiny_experiment("encoder", method="lora", max_steps=4, eval_strategy="steps", eval_steps=2))
    record, stem = new_record(), tmp_path / "curve"
    callbacks = [learning_curve.CurveRecorder(record, config.tasks, stem)]
    if dies:
        with pytest.raises(RuntimeError, match="killed"):
            train(config, callbacks=[*callbacks, DieAfterFirstEvaluation()])
    else:
        final = train(config, callbacks=callbacks)
    saved = json.loads(stem.with_suffix(".json").read_text())
    steps = [p["step"] for p in saved["points"]]
    assert steps == ([2] if dies else [2, 4])  # the final evaluate() at step 4 replaces, not repeats, its point
    assert set(saved["points"][0]) == {"step", "validation_average", "rte", "stsb"}
    if not dies:
        assert saved["points"][-1]["validation_average"] == pytest.approx(final["paper_average"])
    assert "Still running, or stopped without a word" in stem.with_suffix(".md").read_text()
