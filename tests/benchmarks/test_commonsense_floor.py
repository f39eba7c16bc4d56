"""``benchmarks/commonsense_floor.py``: chance and majority levels, the reuse of a quality.py floor run only where
its config and rows are these, and the table."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from _scripts import import_benchmark

from pyramid_peft.tasks import get_task
from pyramid_peft.training.evaluate import EvalSet

ROWS = [  # two ARC-style questions, 4 and 3 options
    {"question": "Which is a metal?", "passage": None, "choices": ["iron", "wood", "glass", "paper"], "label": 0},
    {"question": "What do plants take in?", "passage": None, "choices": ["sand", "light", "salt"], "label": 1},
]


@pytest.fixture(scope="module")
def floor():
    return import_benchmark("commonsense_floor")


@pytest.fixture(scope="module")
def quality():
    return import_benchmark("quality")


def test_chance_is_the_mean_of_one_over_the_options(floor):
    levels = floor.task_levels(EvalSet(get_task("arc_easy"), 0, ROWS, "test"))
    assert levels["chance"] == pytest.approx(100 * (1 / 4 + 1 / 3) / 2)
    assert levels["majority"] == pytest.approx(50.0)  # labels 0 and 1: the most common is right once


def run_file(quality, tmp_path: Path, scoring: str, examples: list[dict], predictions: list[int]) -> Path:
    """A quality.py run file of the commonsense4 floor (ARC-Easy only) made under ``scoring``."""
    suite = quality.load_suite("commonsense4", {"tasks": ["arc_easy"]}, {"tasks": ["arc_easy"]})
    config = suite.config(quality.RunKey("zero-shot", None, 0), Path("runs")).to_dict()
    config["data"]["answer_scoring"] = scoring
    reported = {
        "split": "test",
        "num_examples": len(examples),
        "fingerprint": quality.fingerprint(examples),
        "collapsed": False,
        "predictions": predictions,
        "labels": [e["label"] for e in examples],
    }
    path = tmp_path / "zero-shot-seed0.json"
    path.write_text(json.dumps({"config": config, "reported": {"arc_easy": reported}}))
    return path


def test_a_run_is_reused_only_under_the_same_config_scoring_and_rows(floor, quality, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(floor, "ROOT", tmp_path)  # the table names the file relative to the repository
    suite = quality.load_suite("commonsense4", {"tasks": ["arc_easy"]}, {"tasks": ["arc_easy"]})
    experiment = SimpleNamespace(config=suite.config(quality.RunKey("zero-shot", None, 0), Path("elsewhere")))
    eval_set = EvalSet(get_task("arc_easy"), 0, ROWS, "test")
    path = run_file(quality, tmp_path, "likelihood", ROWS, [0, 2])
    score = floor.reused_floor(experiment, "likelihood", eval_set, path)
    assert score["accuracy"] == pytest.approx(50.0) and score["from"] == "zero-shot-seed0.json"
    assert floor.reused_floor(experiment, "answer_text", eval_set, path) is None  # another scoring
    other_rows = EvalSet(get_task("arc_easy"), 0, ROWS[:1], "test")
    assert floor.reused_floor(experiment, "likelihood", other_rows, path) is None  # other rows
    printed = capsys.readouterr().out
    assert "data.answer_scoring: was 'likelihood', now 'answer_text'" in printed and "other rows" in printed


def test_the_table_shows_both_scorings_beside_chance_and_marks_reused_and_collapsed_scores(floor):
    record = {
        "rows": 2,
        "model": "smollm2-135m",
        "commands": ["python benchmarks/commonsense_floor.py --rows 2"],
        "machine": {"cpu": "cpu", "torch_threads": 1, "torch": "2", "date": "today"},
        "tasks": {
            "arc_easy": {
                "num_examples": 2,
                "chance": 29.17,
                "majority": 50.0,
                "scores": {
                    "likelihood": {"accuracy": 50.0, "num_examples": 2, "collapsed": True, "from": "run.json"},
                    "answer_text": {"accuracy": 100.0, "num_examples": 2, "collapsed": False},
                },
            }
        },
    }
    table = floor.markdown(record)
    assert "| task | rows | chance | majority | option letter | answer text (acc_norm) |" in table
    assert "| arc_easy | 2 | 29.2 | 50.0 | 50.0 [9.5, 90.5] † ‡ | 100.0 [34.2, 100.0] |" in table
    assert "from run.json" in table and "`python benchmarks/commonsense_floor.py --rows 2`" in table


@pytest.mark.parametrize(("accuracy", "rows"), [(47.2, 500), (50.0, 2), (100.0, 2), (0.0, 10)])
def test_the_interval_is_wilsons(floor, accuracy, rows):
    """Against the closed form: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.959964."""
    z, p = 1.959964, accuracy / 100
    centre, spread = p + z * z / (2 * rows), z * (p * (1 - p) / rows + z * z / (4 * rows * rows)) ** 0.5
    expected = (100 * (centre - spread) / (1 + z * z / rows), 100 * (centre + spread) / (1 + z * z / rows))
    assert floor.wilson_interval(accuracy, rows) == pytest.approx(expected, abs=1e-4)
