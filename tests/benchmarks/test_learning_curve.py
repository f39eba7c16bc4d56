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
    record, stem = new_record(), learning_curve.curve_stem(tmp_path, "tiny", "lora", 1e-3, 4, None)
    callbacks = [learning_curve.CurveRecorder(record, config.tasks, stem)]
    if dies:
        with pytest.raises(RuntimeError, match="killed"):
            train(config, callbacks=[*callbacks, DieAfterFirstEvaluation()])
    else:
        final = train(config, callbacks=callbacks)
    assert sorted(p.name for p in tmp_path.glob("learning-curve-*")) == [f"{stem.name}.json", f"{stem.name}.md"]
    saved = json.loads(learning_curve.curve_file(stem, ".json").read_text())
    steps = [p["step"] for p in saved["points"]]
    assert steps == ([2] if dies else [2, 4])  # the final evaluate() at step 4 replaces, not repeats, its point
    assert set(saved["points"][0]) == {"step", "validation_average", "rte", "stsb"}
    if not dies:
        assert saved["points"][-1]["validation_average"] == pytest.approx(final["paper_average"])
    assert "Still running, or stopped without a word" in learning_curve.curve_file(stem, ".md").read_text()


def test_curves_of_other_rates_or_budgets_get_their_own_files(learning_curve, tmp_path):
    stems = {
        learning_curve.curve_stem(tmp_path, "glue8", "lora", rate, steps, tasks)
        for rate, steps, tasks in [(1e-3, 900, None), (3.16e-4, 900, None), (1e-3, 2400, None), (1e-3, 900, ["cola"])]
    }
    assert len(stems) == 4 and len({learning_curve.curve_file(s, ".json") for s in stems}) == 4
    assert learning_curve.curve_stem(tmp_path, "glue8", "lora", 3.16e-4, 2400, None).name == (
        "learning-curve-glue8-lora-lr0.000316-2400steps"
    )


def test_a_finished_curve_is_never_run_over(learning_curve, tmp_path):
    stem = learning_curve.curve_stem(tmp_path, "glue8", "lora", 1e-3, 900, None)
    path = learning_curve.curve_file(stem, ".json")
    learning_curve.refuse_to_replace(stem)  # nothing there yet
    path.write_text(json.dumps({**new_record(), "points": [{"step": 2}]}))
    learning_curve.refuse_to_replace(stem)  # a curve killed without a word (SIGKILL) may be measured again
    finished = {**new_record(), "wall_seconds": 12.0}
    path.write_text(json.dumps(finished))
    other_budget = learning_curve.curve_stem(tmp_path, "glue8", "lora", 1e-3, 2400, None)
    learning_curve.refuse_to_replace(other_budget)  # the same rate at another budget is another curve
    with pytest.raises(SystemExit, match="holds a finished learning curve; move it away"):
        learning_curve.refuse_to_replace(stem)
    assert json.loads(path.read_text()) == finished
