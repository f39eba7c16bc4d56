"""Commonsense-4's zero-shot floor under both answer scorings: option letters against option texts (acc_norm).

    python benchmarks/commonsense_floor.py [--rows 500] [--scorings likelihood answer_text] [--tasks boolq ...]
    python benchmarks/commonsense_floor.py --table-only      # rewrite the Markdown from the JSON

The untuned model of ``configs/benchmarks/commonsense4-smollm2.yaml`` (its adapter disabled, as the suite's
``zero-shot`` run) predicts the first ``--rows`` test rows of each task twice, with the same prompts and data:

* ``likelihood``: the option letter (BoolQ: yes / no) it finds most likely after the prompt that lists the options
  (the suite's scoring; a small model that never learnt the letter format lands near chance);
* ``answer_text``: the option whose own text is most likely after the question, per character, the options not
  listed (lm-evaluation-harness's ``acc_norm``; :mod:`pyramid_peft.training.answer_text`).

Each task's accuracy is shown beside its chance level (the mean of 1 / options over the rows) and its majority level.
``--reuse RECORD`` takes a scoring's predictions from a run file of ``quality.py commonsense4`` (its ``zero-shot``
run) instead of predicting again, only where that run's config is this one's (under that scoring) and its rows are
these (the same fingerprint); the table names the file.
Writes ``benchmarks/results/commonsense4-floor.{json,md}`` after every task and scoring, so an interrupted run keeps
what it finished and a rerun skips it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from scipy.stats import binomtest

from common import machine_info
from pyramid_peft.atomic import atomic_write_text
from pyramid_peft.metrics import compute_metrics
from pyramid_peft.training import build_experiment
from pyramid_peft.training.answer_text import answer_options
from pyramid_peft.training.evaluate import EvalSetup, Predictor, majority_level
from pyramid_peft.training.experiment import evaluation_setup, load_splits
from quality import (
    RunKey,
    aware_time,
    config_differences,
    evaluate_set,
    fingerprint,
    load_suite,
)

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "results" / "commonsense4-floor"
SCORINGS = ("likelihood", "answer_text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500, help="first test rows per task (default 500)")
    parser.add_argument("--scorings", nargs="+", choices=SCORINGS, default=list(SCORINGS))
    parser.add_argument("--tasks", nargs="+", help="default: the suite's four")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"files' stem (default {OUTPUT})")
    parser.add_argument("--table-only", action="store_true", help="rewrite the Markdown from the JSON, run nothing")
    parser.add_argument(
        "--reuse", type=Path, metavar="RECORD", help="a quality.py run file of this floor whose predictions to reuse"
    )
    parser.add_argument(
        "--no-new-runs-after", type=aware_time, metavar="TIME", help="start no task after this ISO time (UTC)"
    )
    return parser.parse_args(argv)


def floor_experiment(rows: int, tasks: list[str] | None):
    """The suite's zero-shot experiment with ``rows`` evaluation rows per task."""
    suite = load_suite("commonsense4", {"data.max_eval_examples": rows, **({"tasks": tasks} if tasks else {})})
    config = suite.config(RunKey("zero-shot", None, suite.seeds[0]), Path("runs/benchmarks"))
    return build_experiment(config)


def evaluate_floor(experiment, setup: EvalSetup, scoring: str, eval_set) -> dict:
    """One task's test rows under one scoring, the adapter disabled."""
    setup = replace(setup, answer_scoring=scoring)
    predictor = Predictor.for_run(experiment.model, setup, experiment.config.training_arguments())
    start, cpu_start = time.perf_counter(), time.process_time()
    with experiment.peft_model.disable_adapter():
        result = evaluate_set(predictor, eval_set)
    return {
        "split": result["split"],
        "num_examples": result["num_examples"],
        "accuracy": result["metrics"]["paper"],
        "collapsed": result["collapsed"],
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }


def reused_floor(experiment, scoring: str, eval_set, run_file: Path) -> dict | None:
    """The task's score from a quality.py run file made under this config with ``scoring`` on these rows, else
    None (the reason printed)."""
    record = json.loads(run_file.read_text())
    config = experiment.config.to_dict()
    config["data"]["answer_scoring"] = scoring
    reported = record["reported"].get(eval_set.task.name)
    differ = config_differences(record["config"], config)
    if differ or reported is None or reported["fingerprint"] != fingerprint(eval_set.examples):
        why = "; ".join(differ[:3]) or "other rows"
        print(f"[floor] {run_file.name} not reused for {eval_set.task.name} {scoring}: {why}", flush=True)
        return None
    metrics = compute_metrics(eval_set.task, reported["predictions"], reported["labels"])
    return {
        "split": reported["split"],
        "num_examples": reported["num_examples"],
        "accuracy": metrics["paper"],
        "collapsed": reported["collapsed"],
        "from": run_file.resolve().relative_to(ROOT).as_posix(),
    }


def task_levels(eval_set) -> dict:
    """Chance (mean 1 / options, x100) and majority (always the most common label) of the task's rows."""
    examples = eval_set.examples
    labels = [example["label"] for example in examples]
    chance = statistics.fmean(1 / len(answer_options(eval_set.task, example)) for example in examples)
    return {"chance": 100 * chance, "majority": majority_level(eval_set.task, labels)}


def markdown(record: dict) -> str:
    """The floor table: per task its chance and majority levels and the accuracy under each scoring."""
    scorings = [s for s in SCORINGS if any(s in t["scores"] for t in record["tasks"].values())]
    lines = [
        "<!-- written by benchmarks/commonsense_floor.py -->",
        f"### Commonsense-4 zero-shot floor of {record['model']} (first {record['rows']} test rows per task)",
        "",
        "| task | rows | chance | majority | " + " | ".join(LABELS[s] for s in scorings) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in scorings) + " |",
    ]
    reused = sorted(
        {score["from"] for t in record["tasks"].values() for score in t["scores"].values() if "from" in score}
    )
    for task, entry in record["tasks"].items():
        cells = [_score_cell(entry["scores"].get(s)) for s in scorings]
        lines.append(
            f"| {task} | {entry['num_examples']} | {entry['chance']:.1f} | {entry['majority']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Accuracy x100 of the untuned model (adapter disabled). Option letter: the letter (BoolQ: yes / no) "
        "the model finds most likely after a prompt that lists the lettered options (the suite's scoring). Answer "
        "text: each option's own text as the continuation of the question, the options not listed, its "
        "log-likelihood divided by its length in characters (lm-evaluation-harness's acc_norm). Chance: the mean "
        "of 1 / options over the rows; majority: always the most common label. † the scoring predicts one option "
        "for every row. [low, high]: 95% Wilson interval over the rows."
        + (f" ‡ predictions of the same rows under the same config, from {', '.join(reused)}." if reused else ""),
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in record["commands"]) + f". Machine: {record['machine']['cpu']}, "
        f"{record['machine']['torch_threads']} torch thread(s), torch {record['machine']['torch']}, "
        f"{record['machine']['date']}.",
    ]
    return "\n".join(lines) + "\n"


LABELS = {"likelihood": "option letter", "answer_text": "answer text (acc_norm)"}


def _score_cell(score: dict | None) -> str:
    if score is None:
        return ""
    low, high = wilson_interval(score["accuracy"], score["num_examples"])
    marks = (" †" if score["collapsed"] else "") + (" ‡" if "from" in score else "")
    return f"{score['accuracy']:.1f} [{low:.1f}, {high:.1f}]{marks}"


def wilson_interval(accuracy: float, rows: int) -> tuple[float, float]:
    """The 95% Wilson score interval (x100) of an accuracy (x100) over ``rows`` rows."""
    interval = binomtest(round(accuracy * rows / 100), rows).proportion_ci(confidence_level=0.95, method="wilson")
    return 100 * interval.low, 100 * interval.high


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    json_path, md_path = args.output.with_suffix(".json"), args.output.with_suffix(".md")
    if args.table_only:
        table = markdown(json.loads(json_path.read_text()))
        atomic_write_text(md_path, table)
        print(table)
        return
    torch.set_num_threads(args.threads)
    experiment = floor_experiment(args.rows, args.tasks)
    experiment.model.eval()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/commonsense_floor.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    record = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if record.get("rows") != args.rows or record.get("model") != experiment.config.model.name:
        record = {"rows": args.rows, "model": experiment.config.model.name, "tasks": {}}
    record.update(machine=machine_info())
    record["commands"] = [*record.get("commands", [record["command"]] if "command" in record else []), command.strip()]
    record.pop("command", None)
    setup = evaluation_setup(experiment, load_splits(experiment), use_test=True)
    for scoring, eval_set in itertools.product(args.scorings, setup.sets):  # a scoring over every task, then the next
        entry = record["tasks"].setdefault(
            eval_set.task.name, {"num_examples": len(eval_set.examples), **task_levels(eval_set), "scores": {}}
        )
        if scoring in entry["scores"]:
            continue  # done by an earlier sitting
        if args.no_new_runs_after and datetime.now(timezone.utc) > args.no_new_runs_after:
            print(f"[floor] past {args.no_new_runs_after.isoformat()}: {eval_set.task.name} {scoring} not started")
            continue
        reused = reused_floor(experiment, scoring, eval_set, args.reuse) if args.reuse else None
        score = entry["scores"][scoring] = reused or evaluate_floor(experiment, setup, scoring, eval_set)
        atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
        atomic_write_text(md_path, markdown(record))
        cost = f"from {score['from']}" if reused else f"{score['seconds']:.0f} s, {score['cpu_seconds']:.0f} s of CPU"
        print(f"[floor] {eval_set.task.name} {scoring}: {score['accuracy']:.1f} ({cost})", flush=True)
    print(markdown(record))


if __name__ == "__main__":
    with torch.no_grad():
        main()
