"""A learning curve for choosing a quality suite's budget: one method, one learning rate, the validation average every
few steps.

    python benchmarks/learning_curve.py glue8 --variant lora --learning-rate 1e-3 --steps 900 --every 150

The run is the suite's (``configs/benchmarks/``: model, tasks, data protocol, batch, linear schedule) with
``max_steps`` set to ``--steps``, evaluated on the validation split carved from train every ``--every`` steps (never
on the reported split). The last point is a full run of that budget; earlier points are the same run mid-way, at a
learning rate not yet annealed, so they are lower bounds for a budget of that length. Writes
``benchmarks/results/learning-curve-<suite>-<variant>-lr<rate>-<steps>steps[-<tasks>].md`` and ``.json`` with the
curve, the wall-clock time, the machine and its load (``uptime``) at the start and the end. The files are rewritten
after every evaluation, so a run stopped in any way keeps the points it reached; one stopped by SIGTERM / Ctrl-C (it
saves a checkpoint first) also says where it stopped. A finished curve is a record: the script refuses to run over it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import TrainerCallback

from common import machine_info
from pyramid_peft.atomic import atomic_write_text
from pyramid_peft.training import train
from pyramid_peft.training.guards import TrainingInterrupted
from quality import RUNS_DIR, RunKey, load_suite

RESULTS = Path(__file__).resolve().parent / "results"


def curve_point(metrics: dict, step: int, tasks: list[str]) -> dict:
    """One evaluation's point: the step, the validation average and each task's paper metric."""
    return {
        "step": step,
        "validation_average": metrics["eval_paper_average"],
        **{t: metrics[key] for t in tasks if (key := f"eval_{t}_paper") in metrics},
    }


class CurveRecorder(TrainerCallback):
    """Adds each evaluation's point to the record and rewrites the curve's files at once, so a run stopped in any
    way (SIGTERM, SIGKILL, the session's end) leaves every point it reached on disk."""

    def __init__(self, record: dict, tasks: list[str], stem: Path):
        self.record, self.tasks, self.stem = record, tasks, stem

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_paper_average" in metrics:
            point = curve_point(metrics, state.global_step, self.tasks)
            points = [p for p in self.record["points"] if p["step"] != point["step"]]  # the final evaluate() repeats
            self.record["points"] = [*points, point]
            write_curve(self.record, self.tasks, self.stem)


def curve_file(stem: Path, suffix: str) -> Path:
    """The stem's file with ``suffix``: appended, not ``with_suffix``, which would cut the stem at its rate's dot."""
    return stem.parent / (stem.name + suffix)


def write_curve(record: dict, tasks: list[str], stem: Path) -> None:
    atomic_write_text(curve_file(stem, ".json"), json.dumps(record, indent=2) + "\n")
    atomic_write_text(curve_file(stem, ".md"), markdown(record, tasks))


def curve_stem(out: Path, suite: str, variant: str, learning_rate: float, steps: int, tasks: list[str] | None) -> Path:
    """The curve's files, named by everything that sets the curve apart, so that no curve replaces another."""
    return out / "-".join(["learning-curve", suite, variant, f"lr{learning_rate:g}", f"{steps}steps", *(tasks or [])])


def refuse_to_replace(stem: Path) -> None:
    """A curve that finished (or was stopped and said so) is kept: a second run would overwrite its points."""
    path = curve_file(stem, ".json")
    if path.exists() and json.loads(path.read_text())["wall_seconds"] is not None:
        raise SystemExit(f"{path} holds a finished learning curve; move it away (or pass --out) to measure it again")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite")
    parser.add_argument("--variant", default="lora")
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", nargs="+", help="a subset of the suite's tasks (default: all of them)")
    parser.add_argument("--max-eval", type=int, help="validation rows per task (default: all); for a quick check")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the curve (default: {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    every = {
        "max_steps": args.steps,
        "eval_strategy": "steps",
        "eval_steps": args.every,
        "save_strategy": "steps",
        "save_steps": args.every,
        "save_total_limit": 1,
        "logging_steps": args.every,
        **({"data.max_eval_examples": args.max_eval} if args.max_eval else {}),
        **({"tasks": args.tasks} if args.tasks else {}),
    }
    suite = load_suite(args.suite, every)
    key = RunKey(args.variant, args.learning_rate, suite.seeds[0])
    stem = curve_stem(args.out, args.suite, args.variant, args.learning_rate, args.steps, args.tasks)
    refuse_to_replace(stem)
    config = suite.config(key, RUNS_DIR / "learning-curve" / stem.name)
    record = {
        "suite": args.suite,
        "variant": args.variant,
        "learning_rate": args.learning_rate,
        "steps": args.steps,
        "tasks": config.tasks,
        "points": [],
        "final": None,
        "stopped_at_step": None,
        "wall_seconds": None,
        "uptime_start": uptime(),
        "uptime_end": None,
        "machine": machine_info(),
        "config": config.to_dict(),
    }
    start = time.perf_counter()
    try:
        record["final"] = train(config, callbacks=[CurveRecorder(record, config.tasks, stem)])["paper_average"]
    except TrainingInterrupted as stop:
        record["stopped_at_step"] = stop.step
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    record["uptime_end"] = uptime()
    write_curve(record, config.tasks, stem)
    print(markdown(record, config.tasks))


def markdown(record: dict, tasks: list[str]) -> str:
    lines = [
        f"<!-- written by benchmarks/learning_curve.py {record['suite']} --variant {record['variant']} "
        f"--learning-rate {record['learning_rate']:g} --steps {record['steps']} --tasks {' '.join(tasks)} -->",
        "",
        f"Learning curve: {record['variant']} at learning rate {record['learning_rate']:g}, linear schedule over "
        f"{record['steps']} steps; validation split carved from train (never the reported split).",
        "",
        "| step | validation average | " + " | ".join(tasks) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in tasks) + " |",
    ]
    for point in record["points"]:
        lines.append(
            f"| {point['step']} | {point['validation_average']:.1f} | "
            + " | ".join(f"{point.get(t, float('nan')):.1f}" for t in tasks)
            + " |"
        )
    if record["wall_seconds"] is None:
        lines += ["", "Still running, or stopped without a word (SIGKILL): the points above are those it reached."]
        return "\n".join(lines) + "\n"
    if record["stopped_at_step"] is not None:
        lines += [
            "",
            f"Stopped at step {record['stopped_at_step']} of {record['steps']} (SIGTERM): the schedule had "
            "not annealed, so every point is a lower bound for a budget of its length.",
        ]
    lines += [
        "",
        f"Wall clock {record['wall_seconds'] / 60:.1f} minutes (training and every evaluation), one torch "
        f"thread. Load at the start: `{record['uptime_start']}`; at the end: `{record['uptime_end']}`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
