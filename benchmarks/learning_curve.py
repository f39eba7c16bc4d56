"""A learning curve for choosing a quality suite's budget: one method, one learning rate, the validation average every
few steps.

    python benchmarks/learning_curve.py glue8 --variant lora --learning-rate 1e-3 --steps 900 --every 150

The run is the suite's (``configs/benchmarks/``: model, tasks, data protocol, batch, linear schedule) with
``max_steps`` set to ``--steps``, evaluated on the validation split carved from train every ``--every`` steps (never
on the reported split). The last point is a full run of that budget; earlier points are the same run mid-way, at a
learning rate not yet annealed, so they are lower bounds for a budget of that length. Writes
``benchmarks/results/learning-curve-<suite>-<variant>.md`` and ``.json`` with the curve, the wall-clock time, the
machine and its load (``uptime``) at the start and the end. A run stopped by SIGTERM / Ctrl-C (it saves a checkpoint
first) still writes the points it reached, and says where it stopped.
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
from transformers.trainer_utils import get_last_checkpoint

from common import machine_info
from pyramid_peft.atomic import atomic_write_text
from pyramid_peft.training import train
from pyramid_peft.training.guards import TrainingInterrupted
from quality import RUNS_DIR, RunKey, load_suite

RESULTS = Path(__file__).resolve().parent / "results"


def curve_points(log_history: list[dict], tasks: list[str]) -> list[dict]:
    """Per evaluation in the Trainer's log: the step, the validation average and each task's paper metric."""
    return [
        {
            "step": entry["step"],
            "validation_average": entry["eval_paper_average"],
            **{t: entry[key] for t in tasks if (key := f"eval_{t}_paper") in entry},
        }
        for entry in log_history
        if "eval_paper_average" in entry
    ]


def logged(run_dir: str) -> list[dict]:
    """The Trainer's log history as its newest checkpoint saved it (empty before the first checkpoint)."""
    checkpoint = get_last_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if checkpoint is None:
        return []
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]


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
    }
    suite = load_suite(args.suite, every)
    key = RunKey(args.variant, args.learning_rate, suite.seeds[0])
    config = suite.config(key, RUNS_DIR / "learning-curve" / args.out.name)
    start_load, start = uptime(), time.perf_counter()
    try:
        final, stopped_at = train(config)["paper_average"], None
    except TrainingInterrupted as stop:
        final, stopped_at = None, stop.step
    wall = time.perf_counter() - start
    points = curve_points(logged(config.training["output_dir"]), config.tasks)
    record = {
        "suite": args.suite,
        "variant": args.variant,
        "learning_rate": args.learning_rate,
        "steps": args.steps,
        "points": points,
        "final": final,
        "stopped_at_step": stopped_at,
        "wall_seconds": round(wall, 1),
        "uptime_start": start_load,
        "uptime_end": uptime(),
        "machine": machine_info(),
        "config": config.to_dict(),
    }
    stem = args.out / f"learning-curve-{args.suite}-{args.variant}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(record, config.tasks))
    print(markdown(record, config.tasks))


def markdown(record: dict, tasks: list[str]) -> str:
    lines = [
        f"<!-- written by benchmarks/learning_curve.py {record['suite']} --variant {record['variant']} -->",
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
