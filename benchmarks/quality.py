"""Quality of EPT against its peers under one training budget: GLUE-8 on MiniLM, Commonsense-4 on SmolLM2.

    python benchmarks/quality.py glue8 [--methods ept-kron2d lora] [--seeds 0 1 2] [--threads 1]
    python benchmarks/quality.py commonsense4 [...]
    python benchmarks/quality.py glue8 --summarize-only      # rebuild the table from the result files
    python benchmarks/quality.py glue8 --smoke               # a few steps, into a temporary folder (CI)

A suite is one config in ``configs/benchmarks/``: the experiment sections every method shares (model, tasks, data,
sampling, training budget and schedule) and a ``benchmark`` section whose ``variants`` give each method its own
``method`` section (applied as a sweep variant, :mod:`pyramid_peft.analysis.sweeps`), optionally its own ``seeds``,
and ``train: false`` for the untuned model's zero-shot floor. Runs go through ``pyramid_peft.training.train``.

Each variant-seed writes ``<results-dir>/<suite>/<variant>-seed<k>.json``, a sweep result record (so
``ept analyze sweep`` reads it too) plus wall-clock seconds, machine, load and the resolved config. A run whose file
exists is skipped, and an interrupted run restarts from its last checkpoint in ``runs/benchmarks/``, so a suite can
be completed over several sittings. After the runs, ``quality-<suite>.md`` and ``.json`` beside the results folder
hold the table: trainable parameters per task in both accountings (spec §2: with routers and task embeddings as
MoRE counts, adapter weights only as EPT counts; per task = total / tasks, for shared LoRA too; heads left out),
each task's paper metric, and the average, as mean ± standard deviation where a variant has several seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers.trainer_utils import get_last_checkpoint

from common import machine_info
from pyramid_peft import count_parameters, method_names
from pyramid_peft.atomic import atomic_write_text
from pyramid_peft.analysis.params import paper_units
from pyramid_peft.analysis.sweeps import Sweep, TableLayout, load_results, result_record, summarize
from pyramid_peft.training import ExperimentConfig, build_experiment, train
from pyramid_peft.training.config import read_yaml
from pyramid_peft.training.evaluate import Predictor, evaluate_tasks
from pyramid_peft.training.full import FULL, full_parameter_count
from pyramid_peft.training.guards import TrainingInterrupted
from pyramid_peft.training.heads import needs_task_ids
from pyramid_peft.training.experiment import collators, eval_sets, load_splits

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "glue8": ROOT / "configs" / "benchmarks" / "glue8-minilm.yaml",
    "commonsense4": ROOT / "configs" / "benchmarks" / "commonsense4-smollm2.yaml",
}
RESULTS_DIR = ROOT / "benchmarks" / "results" / "quality"
RUNS_DIR = Path("runs/benchmarks")
PARAM_COLUMNS = {"per_task": "params/task (all)", "per_task_without_router": "params/task (no router)"}
# --smoke: a few steps and a few evaluation examples, one seed, the untuned floor, LoRA and EPT.
SMOKE_SET = {"max_steps": 2, "per_device_train_batch_size": 4, "warmup_steps": 0, "logging_steps": 1,
             "save_strategy": "no", "report_to": "none", "data.max_eval_examples": 8}
SMOKE_VARIANTS = ("zero-shot", "lora", "ept-kron2d")


@dataclass
class Suite:
    """A benchmark config: the shared experiment and variants (as a :class:`Sweep`), seeds and trained flags."""

    key: str  # the command's name for it: glue8, commonsense4
    sweep: Sweep
    seeds: dict[str, list[int]]  # variant -> its seeds
    trained: dict[str, bool]  # False: evaluate the untuned model

    def runnable(self, variant: str) -> bool:
        """Whether this package has the variant's method (a zero-shot floor always runs)."""
        return not self.trained[variant] or self.sweep.config(variant).method.name in (*method_names(), FULL)

    def config(self, variant: str, seed: int, runs_dir: Path) -> ExperimentConfig:
        """The variant's experiment config for ``seed``, running in ``runs_dir/<suite>/<variant>-seed<seed>``."""
        config = self.sweep.config(variant, seed)
        output_dir = str(runs_dir / self.key / f"{variant}-seed{seed}")
        return replace(config, training={**config.training, "output_dir": output_dir})


def load_suite(key: str, shared: dict | None = None) -> Suite:
    """Read a suite's config; ``shared`` overrides (``{"max_steps": 2}``) apply to every variant."""
    raw = read_yaml(SUITES[key].read_text())
    bench = raw.pop("benchmark")
    variants = {name: dict(overrides or {}) for name, overrides in bench["variants"].items()}
    seeds = {name: [int(s) for s in v.pop("seeds", bench["seeds"])] for name, v in variants.items()}
    trained = {name: bool(v.pop("train", True)) for name, v in variants.items()}
    table = TableLayout(title=bench.get("title", ""), columns=["Method", *PARAM_COLUMNS.values()],
                        tasks=list(bench["tasks"]))
    sweep = Sweep(bench["name"], raw, dict(shared or {}), variants, list(bench["seeds"]), table, cells={})
    return Suite(key, sweep, seeds, trained)


# -- running --------------------------------------------------------------------------------------------------
def result_path(results_dir: Path, suite: Suite, variant: str, seed: int) -> Path:
    return results_dir / suite.key / f"{variant}-seed{seed}.json"


def plan_runs(suite: Suite, variants: list[str], seeds: list[int] | None) -> list[tuple[str, int]]:
    """(variant, seed) pairs, seed-major: every variant's first seed before any second seed."""
    per_variant = {v: seeds if seeds is not None else suite.seeds[v] for v in variants}
    depth = max((len(s) for s in per_variant.values()), default=0)
    return [(v, s[i]) for i in range(depth) for v, s in per_variant.items() if i < len(s)]


def run_suite(suite: Suite, runs: list[tuple[str, int]], results_dir: Path, runs_dir: Path) -> None:
    """Run every (variant, seed) whose result file is missing; variants without a method, and runs that fail, are
    reported and skipped. A run stopped by SIGTERM / Ctrl-C (after saving its checkpoint) stops the suite."""
    for variant, seed in runs:
        path = result_path(results_dir, suite, variant, seed)
        if path.exists():
            print(f"[quality] {path.name}: done already, skipped", flush=True)
        elif not suite.runnable(variant):
            print(f"[quality] {variant}: method {suite.sweep.config(variant).method.name!r} is not in "
                  f"pyramid_peft ({', '.join(method_names())}); skipped", flush=True)
        else:
            print(f"[quality] {suite.key} {variant} seed {seed}: running", flush=True)
            try:
                record = run_one(suite, variant, seed, runs_dir)
            except TrainingInterrupted as stop:  # SIGTERM / Ctrl-C: the run saved a checkpoint; stop the suite too
                raise SystemExit(f"[quality] stopped: {stop}") from None
            except Exception:  # noqa: BLE001 - one failing run is reported; the suite goes on with the others
                print(f"[quality] {variant} seed {seed} FAILED:\n{traceback.format_exc()}", flush=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
            print(f"[quality] {path}: average {record['average']['paper_average']:.2f}, "
                  f"{record['wall_seconds']:.0f} s", flush=True)


def run_one(suite: Suite, variant: str, seed: int, runs_dir: Path) -> dict:
    """Train (or, for the floor, only evaluate) one variant-seed; its result record with timing and machine."""
    config = suite.config(variant, seed, runs_dir)
    machine = machine_info()
    checkpoint = last_checkpoint(config) if suite.trained[variant] else None
    start = time.perf_counter()
    results = train_resumable(config, checkpoint) if suite.trained[variant] else zero_shot(config)
    wall = time.perf_counter() - start
    params = adapter_parameters(config) if suite.trained[variant] else {}
    return {
        **result_record(variant, seed, results, params),
        "suite": suite.key,
        "steps": results.get("step", 0),
        "wall_seconds": round(wall, 1),  # this sitting only, when resumed
        "resumed_from": checkpoint,
        "machine": {**machine, "load_average_at_end": list(os.getloadavg())},
        "config": config.to_dict(),
    }


def last_checkpoint(config: ExperimentConfig) -> str | None:
    """The newest checkpoint an earlier sitting left in the run folder, if any."""
    run_dir = Path(config.training["output_dir"])
    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def train_resumable(config: ExperimentConfig, checkpoint: str | None) -> dict:
    """``train(config)``, restarting from ``checkpoint`` (an earlier sitting's) when given."""
    if checkpoint:
        print(f"[quality] resuming from {checkpoint}", flush=True)
        config = replace(config, training={**config.training, "resume_from_checkpoint": checkpoint})
    return train(config)


def zero_shot(config: ExperimentConfig) -> dict:
    """The untuned model's results: the config's experiment with its adapter disabled, evaluated as after training."""
    experiment = build_experiment(config)
    experiment.model.eval()
    _, collator = collators(experiment)
    predictor = Predictor.for_run(experiment.model, experiment.family, collator, experiment.tokenizer,
                                  config.training_arguments(), needs_task_ids(experiment.model),
                                  answer_scoring=config.data.answer_scoring)
    with experiment.peft_model.disable_adapter():
        results = evaluate_tasks(predictor, eval_sets(experiment, load_splits(experiment)))
    return {"model": config.model.name, "method": "none", **results}


def adapter_parameters(config: ExperimentConfig) -> dict:
    """``count_parameters`` of the config's adapter (random weights), per task = total / number of tasks; for full
    fine-tuning, every weight of the model (heads left out, as for the adapters)."""
    experiment = build_experiment(config, random_init=True)
    if experiment.full:
        return full_parameter_count(experiment.peft_model, num_tasks=len(config.tasks))
    return count_parameters(experiment.peft_model, num_tasks=len(config.tasks))


# -- the table ------------------------------------------------------------------------------------------------
def summarize_suite(suite: Suite, results_dir: Path) -> tuple[str, dict]:
    """The suite's Markdown table (:func:`summarize`, in the suite's variant order) and its JSON form."""
    files = sorted((results_dir / suite.key).glob("*.json"))
    if not files:
        raise SystemExit(f"no result files in {results_dir / suite.key}: run the suite first.")
    rows = aggregate(suite, load_results(files))
    cells = {v: [v, *(_param_cell(row["params"].get(k)) for k in PARAM_COLUMNS)] for v, row in rows.items()}
    table = summarize(files, replace(suite.sweep, cells=cells))
    missing = missing_runs(suite, results_dir)
    notes = [claim_check(rows), wall_note(rows), f"Runs left: {', '.join(missing) if missing else 'none'}."]
    summary = {"suite": suite.key, "title": suite.sweep.table.title, "budget": budget(suite), "rows": rows,
               "missing": missing}
    return table + "\n" + "\n\n".join(n for n in notes if n) + "\n", summary


def aggregate(suite: Suite, records: list[dict]) -> dict[str, dict]:
    """Per variant (suite order): seeds, parameters, each task's paper metric and the average (mean, std)."""
    by_variant: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        by_variant.setdefault(record["variant"], []).append(record)
    order = [v for v in suite.sweep.variants if v in by_variant] + [v for v in by_variant if v not in suite.seeds]
    return {v: _aggregate_variant(by_variant[v], suite.sweep.table.tasks) for v in order}


def _aggregate_variant(records: list[dict], tasks: list[str]) -> dict:
    params = records[0].get("params", {})
    return {
        "method": records[0].get("method"),
        "seeds": [r["seed"] for r in records],
        "params": {k: params[k] for k in ("total", *PARAM_COLUMNS) if k in params},
        "metrics": {t: _spread([r["metrics"][t]["paper"] for r in records if t in r["metrics"]]) for t in tasks},
        "average": _spread([r["average"]["paper_average"] for r in records]),
        "wall_seconds": [r.get("wall_seconds") for r in records],
        "resumed": [bool(r.get("resumed_from")) for r in records],
    }


def _spread(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values) if values else None, "std": std, "n": len(values)}


def _param_cell(count: float | None) -> str:
    return "–" if count is None else paper_units(count)


def missing_runs(suite: Suite, results_dir: Path) -> list[str]:
    """``variant-seed<k>`` of every planned run without a result file (unrunnable variants marked so)."""
    missing = []
    for variant, seed in plan_runs(suite, list(suite.sweep.variants), None):
        if not result_path(results_dir, suite, variant, seed).exists():
            missing.append(f"{variant}-seed{seed}" + ("" if suite.runnable(variant) else " (method not in src)"))
    return missing


def claim_check(rows: dict[str, dict]) -> str:
    """The paper's claim, checked: each EPT variant's average against every peer at >= its parameters per task."""
    lines = []
    for name, row in rows.items():
        if row["method"] != "ept":
            continue
        for key, label in PARAM_COLUMNS.items():
            mine = row["params"].get(key, 0)
            peers = {p: r for p, r in rows.items() if r["method"] not in ("ept", "none")
                     and r["params"].get(key, 0) >= mine}
            above = {p: r["average"]["mean"] - row["average"]["mean"] for p, r in peers.items()
                     if r["average"]["mean"] > row["average"]["mean"]}
            verdict = ("at or above all of them" if not above else
                       "below " + ", ".join(f"{p} by {d:.2f}" for p, d in sorted(above.items(), key=lambda x: -x[1])))
            lines.append(f"- {name} ({row['average']['mean']:.2f}) vs the {len(peers)} peers with at least its "
                         f"{label} ({_param_cell(mine)}): {verdict}.")
    return "Claim check (average, means over seeds):\n" + "\n".join(lines) if lines else ""


def wall_note(rows: dict[str, dict]) -> str:
    def minutes(row: dict) -> str:
        resumed = row.get("resumed", [False] * len(row["wall_seconds"]))
        return ", ".join(f"{s / 60:.1f}{'*' if again else ''}" for s, again in zip(row["wall_seconds"], resumed)
                         if s is not None)

    parts = [f"{v} {minutes(r)}" for v, r in rows.items()]
    return ("Wall-clock minutes per run (training + evaluation; * resumed from a checkpoint: the last sitting only): "
            + "; ".join(parts) + ".")


def budget(suite: Suite) -> dict:
    """The shared budget: steps, batch, learning rate and schedule, evaluation cap, as the suite's config has it."""
    config = suite.sweep.config(next(iter(suite.sweep.variants)))
    keys = ("max_steps", "per_device_train_batch_size", "learning_rate", "warmup_steps", "lr_scheduler_type")
    return {**{k: config.training.get(k) for k in keys}, "max_eval_examples": config.data.max_eval_examples,
            "max_source_length": config.data.max_source_length, "sampling": config.sampling.strategy}


def write_summary(suite: Suite, results_dir: Path) -> str:
    """Write ``quality-<suite>.md`` and ``.json`` beside the results folder; returns the Markdown."""
    markdown, summary = summarize_suite(suite, results_dir)
    budget_line = ", ".join(f"{k} {v}" for k, v in summary["budget"].items())
    markdown = f"<!-- written by benchmarks/quality.py {suite.key} -->\n\nBudget: {budget_line}.\n\n" + markdown
    atomic_write_text(results_dir.parent / f"quality-{suite.key}.md", markdown)
    atomic_write_text(results_dir.parent / f"quality-{suite.key}.json", json.dumps(summary, indent=2) + "\n")
    return markdown


# -- command line ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--methods", nargs="+", help="variants to run, in this order (default: all of the suite)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds for every variant (default: the suite's)")
    parser.add_argument("--max_steps", type=int, help="training steps (needs its own --results-dir)")
    parser.add_argument("--smoke", action="store_true", help="a few steps, 8 eval examples, LoRA + EPT, 1 seed")
    parser.add_argument("--results-dir", type=Path, help=f"per-run result files (default: {RESULTS_DIR})")
    parser.add_argument("--runs-dir", type=Path, help=f"run folders with checkpoints (default: {RUNS_DIR})")
    parser.add_argument("--threads", type=int, help="torch threads (1 is often faster on a busy machine)")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild the table from the result files")
    args = parser.parse_args(argv)
    if args.max_steps and not args.results_dir:
        parser.error("--max_steps changes the budget: pass --results-dir too, so the runs do not mix with the suite's")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shared = dict(SMOKE_SET) if args.smoke else {}
    if args.max_steps:
        shared["max_steps"] = args.max_steps
    suite = load_suite(args.suite, shared)
    default_dir = Path(tempfile.mkdtemp(prefix="quality-smoke-")) / "quality" if args.smoke else RESULTS_DIR
    results_dir = args.results_dir or default_dir
    if not args.summarize_only:
        variants = args.methods or [v for v in suite.sweep.variants if not args.smoke or v in SMOKE_VARIANTS]
        unknown = [v for v in variants if v not in suite.sweep.variants]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; {args.suite} has {list(suite.sweep.variants)}.")
        seeds = args.seeds or (suite.sweep.seeds[:1] if args.smoke else None)
        runs_dir = args.runs_dir or (results_dir.parent / "runs" if args.smoke else RUNS_DIR)
        run_suite(suite, plan_runs(suite, variants, seeds), results_dir, runs_dir)
    print(write_summary(suite, results_dir))
    print(f"[quality] results in {results_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
