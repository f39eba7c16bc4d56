"""Quality of EPT against its peers, each method at its own learning rate: GLUE-8 on MiniLM, Commonsense-4 on SmolLM2.

    python benchmarks/quality.py glue8 [--methods lora ept-kron2d] [--threads 1] [--workers 2]
    python benchmarks/quality.py commonsense4 [...]
    python benchmarks/quality.py glue8 --summarize-only      # rebuild the tables, plot and verdict from the files
    python benchmarks/quality.py glue8 --smoke               # 2 learning rates, a few steps, one task (CI)
    python benchmarks/quality.py glue8-1200 --device cpu --no-new-runs-after 2026-12-07T04:55Z   # the rate probe

A suite is one config in ``configs/benchmarks/``: the experiment every method shares (model, tasks, data, sampling,
budget, schedule) and a ``benchmark`` section: ``seeds`` (the final runs; the first is also the sweep's),
``learning_rates`` (the default grid, log-spaced), ``max_extensions``, and ``variants``, each with its own
``method`` section (applied as a sweep variant, :mod:`pyramid_peft.analysis.sweeps`), optionally its own
``learning_rates``, or ``train: false`` for the untuned model's zero-shot floor. A suite with ``probe: true``
(``glue8-1200``: a longer budget whose rates start from a shorter one's choices) gives each variant one
``learning_rate`` instead of a grid and probes it (below).

The protocol (``data.protocol: selection``, :mod:`pyramid_peft.data.splits`): every run trains on train minus a
validation split carved from it (the same rows for every method and seed) and is evaluated on that validation split
and on the reported split (the whole dev set). For each method:

1. **sweep**: one run (the first seed) per learning rate of its grid; the best validation average wins; when the best
   is at an edge of the grid, the grid grows by one step (its own ratio) on that side, up to ``max_extensions`` times;
   in **probe** mode, the grid is the variant's ``learning_rate`` and one step (``probe_ratio``) below it, and it grows
   only downwards: the first seed runs at both; when the lower wins, one more step below (``max_extensions``);
2. **final runs**: every seed at the chosen learning rate (the sweep's run is the first seed's). A rate's score is
   the mean validation average over the seeds run at it, so when a final seed fails (predicts one class) and the
   mean drops below another rate's, that rate is chosen instead and gets its own final seeds.

The reported split is never read to choose anything. Each run writes ``<results>/<suite>/<run>.json`` (run =
``<variant>-lr<lr>-seed<k>``): the validation metrics and the fingerprint of its rows, the reported metrics with
every example's prediction and label, collapse flags, timings, machine, load, and the resolved config (its run
folder and checkpoint named relative to the working directory, or as ``<runs-dir>/...``). A run whose
file exists is skipped; an interrupted run restarts from its last checkpoint in ``runs/benchmarks/``. Several
processes (``--workers 2``, or the same command twice) share a suite: each claims a run with a lock file beside its
result file. After the runs, ``quality_report.py`` (same arguments) writes the tables, the sweep plot and the verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers.trainer_utils import get_last_checkpoint

from common import machine_info
from pyramid_peft import count_parameters
from pyramid_peft.analysis.significance import collapsed
from pyramid_peft.analysis.sweeps import Sweep, TableLayout
from pyramid_peft.atomic import atomic_write_text
from pyramid_peft.metrics import average_scores, compute_metrics
from pyramid_peft.registry import method_choices
from pyramid_peft.training import ExperimentConfig, build_experiment, train
from pyramid_peft.training.checkpoints import (
    LOCATIONS,
    WEIGHTS_CONFIG_FILE,
    config_differences,
    resume_differences,
)
from pyramid_peft.training.config import read_yaml
from pyramid_peft.training.evaluate import EvalSet, Predictor
from pyramid_peft.training.experiment import eval_sets, evaluation_setup, load_splits
from pyramid_peft.training.full import full_parameter_count
from pyramid_peft.training.guards import TrainingInterrupted
from pyramid_peft.training.loading import load_run
from pyramid_peft.training.run_folder import recorded_config

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "glue8": ROOT / "configs" / "benchmarks" / "glue8-minilm.yaml",
    "commonsense4": ROOT / "configs" / "benchmarks" / "commonsense4-smollm2.yaml",
    "glue8-1200": ROOT / "configs" / "benchmarks" / "glue8-minilm-1200.yaml",
}
RESULTS_DIR = ROOT / "benchmarks" / "results" / "lr-selected"
RUNS_DIR = Path("runs/benchmarks")
LOCK_POLL_SECONDS = 30
# --smoke: two learning rates, two steps, one task, 8 evaluation rows per split, two seeds, LoRA and EPT.
SMOKE_SET = {
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "warmup_steps": 0,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "data.max_eval_examples": 8,
}
SMOKE_BENCHMARK = {"learning_rates": [1.0e-3, 1.0e-2], "max_extensions": 0, "seeds": [0, 1]}
SMOKE_TASKS = {"glue8": ["rte"], "commonsense4": ["boolq"], "glue8-1200": ["rte"]}
SMOKE_VARIANTS = ("zero-shot", "lora", "ept-kron2d")


@dataclass(frozen=True)
class RunKey:
    """One run of a suite: a variant at a learning rate (None for the untrained floor) and a seed."""

    variant: str
    learning_rate: float | None
    seed: int

    @property
    def name(self) -> str:
        rate = "" if self.learning_rate is None else f"-lr{self.learning_rate:.2e}"
        return f"{self.variant}{rate}-seed{self.seed}"


@dataclass
class Suite:
    """A benchmark config: the shared experiment and variants (as a :class:`Sweep`), grids, seeds, trained flags."""

    key: str  # the command's name for it: glue8, commonsense4
    sweep: Sweep
    seeds: list[int]  # final seeds; seeds[0] runs the sweep
    grids: dict[str, list[float]]  # variant -> its initial learning-rate grid (empty: not trained)
    max_extensions: int
    probe: bool = False  # the grid grows only downwards; its runs go from the highest rate down (see run order)
    ratios: dict[str, float] = field(default_factory=dict)  # variant -> its grid step (default: the grid's ratio)
    device: str | None = None  # cpu / cuda: where runs train and evaluate (None: the Trainer's default)
    compare_with: str | None = None  # another suite whose answer the report states beside this one's

    def ratio(self, variant: str) -> float:
        """The step by which the variant's grid grows beyond an edge."""
        return self.ratios.get(variant) or grid_ratio(self.grids[variant])

    def trained(self, variant: str) -> bool:
        return bool(self.grids[variant])

    def runnable(self, variant: str) -> bool:
        """Whether this package has the variant's method (a zero-shot floor always runs)."""
        return not self.trained(variant) or self.sweep.config(variant).method.name in method_choices()

    def config(self, key: RunKey, runs_dir: Path) -> ExperimentConfig:
        """The run's experiment config, at its learning rate, running in ``runs_dir/<suite>/<run>``."""
        config = self.sweep.config(key.variant, key.seed)
        training = {**config.training, "output_dir": str(runs_dir / self.key / key.name)}
        if key.learning_rate is not None:
            training["learning_rate"] = key.learning_rate
        if self.device is not None:
            training["use_cpu"] = self.device == "cpu"
        return replace(config, training=training)


def load_suite(key: str, shared: dict | None = None, benchmark: dict | None = None) -> Suite:
    """Read a suite's config; ``shared`` overrides (``{"max_steps": 2}``) apply to every variant, ``benchmark``
    overrides to the ``benchmark`` section (``{"learning_rates": [...]}`` replaces every variant's grid)."""
    raw = read_yaml(SUITES[key].read_text())
    bench = {**raw.pop("benchmark"), **(benchmark or {})}
    variants = {name: dict(overrides or {}) for name, overrides in bench["variants"].items()}
    probe = bool(bench.get("probe", False))
    grids, ratios = {}, {}
    for name, overrides in variants.items():
        where = f"{SUITES[key].name}: variant {name!r}"
        if probe:
            grids[name], ratios[name] = probe_grid(overrides.pop("learning_rate", None), bench, where)
            continue
        own = overrides.pop("learning_rates", None)
        grid = bench["learning_rates"] if own is None or "learning_rates" in (benchmark or {}) else own
        grids[name] = [float(lr) for lr in grid] if overrides.pop("train", True) else []
        check_grid(grids[name], where)
    table = TableLayout(title=bench.get("title", ""), tasks=list(bench["tasks"]))
    seeds = [int(s) for s in bench["seeds"]]
    sweep = Sweep(bench["name"], raw, dict(shared or {}), variants, seeds, table, cells={})
    extensions = int(bench.get("max_extensions", 2))
    return Suite(key, sweep, seeds, grids, extensions, probe, ratios, compare_with=bench.get("compare_with"))


def probe_grid(rate, bench: dict, where: str) -> tuple[list[float], float]:
    """A probe variant's grid, ``[rate / probe_ratio, rate]``, and its step ``probe_ratio``."""
    ratio = float(bench.get("probe_ratio", 0) or 0)
    if rate is None or float(rate) <= 0 or ratio <= 1:
        raise ValueError(
            f"{where}: a probe suite (benchmark.probe: true) needs a positive `learning_rate` per variant (its "
            f"chosen rate at the shorter budget) and benchmark.probe_ratio > 1 (got {rate!r} and {ratio!r}); "
            "e.g. learning_rate: 1.0e-3 and probe_ratio: 3.16."
        )
    return [_rounded(float(rate) / ratio), float(rate)], ratio


def check_grid(grid: list[float], where: str) -> None:
    """A grid is empty (untrained) or >= 2 increasing learning rates a constant factor apart (1% tolerance)."""
    if not grid:
        return
    ratios = [b / a for a, b in zip(grid, grid[1:])] if all(lr > 0 for lr in grid) else [0.0]
    if not ratios or min(ratios) <= 1 or max(ratios) > min(ratios) * 1.01:
        raise ValueError(
            f"{where}: learning_rates {grid} must be >= 2 increasing positive values a constant factor "
            "apart (log-spaced), e.g. [3.16e-4, 1.0e-3, 3.16e-3, 1.0e-2]."
        )


# -- choosing the learning rate -------------------------------------------------------------------------------
def grid_ratio(grid: list[float]) -> float:
    return grid[1] / grid[0]


def choose(
    scores: dict[float, float], ratio: float, extensions_left: int, upwards: bool = True
) -> tuple[float | None, float | None]:
    """(chosen learning rate, None) or (None, the next learning rate to run), from validation scores per rate.

    The best score wins (NaN counts as the worst; ties go to the smaller rate). A best at the grid's edge extends
    the grid by one ``ratio`` step beyond it while ``extensions_left`` (the top edge only when ``upwards``);
    otherwise the best is chosen.
    """
    rates = sorted(scores)
    best = max(rates, key=lambda lr: (-math.inf if math.isnan(scores[lr]) else scores[lr], -lr))
    if extensions_left > 0 and best == rates[0]:
        return None, _rounded(best / ratio)
    if extensions_left > 0 and upwards and best == rates[-1]:
        return None, _rounded(best * ratio)
    return best, None


def _rounded(rate: float) -> float:
    return float(f"{rate:.3g}")  # file names keep 3 significant digits


def variant_plan(suite: Suite, variant: str, done: dict[RunKey, dict]) -> tuple[list[RunKey], float | None]:
    """The runs ``variant`` needs next (those whose results decide what comes after) and its chosen rate, if known."""
    if not suite.trained(variant):
        keys = [RunKey(variant, None, suite.seeds[0])]
        return [k for k in keys if k not in done], None
    grid = list(suite.grids[variant])
    while True:
        missing = [RunKey(variant, lr, suite.seeds[0]) for lr in grid]
        missing = [k for k in missing if k not in done]
        if missing:
            return missing, None
        scores = {lr: validation_score(suite, variant, lr, done) for lr in grid}
        extensions_left = suite.max_extensions - (len(grid) - len(suite.grids[variant]))
        chosen, extra = choose(scores, suite.ratio(variant), extensions_left, upwards=not suite.probe)
        if chosen is not None:
            return [k for k in (RunKey(variant, chosen, s) for s in suite.seeds) if k not in done], chosen
        grid = sorted([*grid, extra])


def validation_score(suite: Suite, variant: str, rate: float, done: dict[RunKey, dict]) -> float:
    """The rate's selection score: the validation average, mean over every seed run at it so far. The sweep runs
    one seed per rate; once the final seeds of the chosen rate have run, their scores count too, so a rate that
    only the first seed trained well (another seed predicting one class) loses the choice, and the next best rate
    gets its final seeds."""
    runs = [done[k] for k in (RunKey(variant, rate, s) for s in suite.seeds) if k in done]
    return statistics.fmean(r["validation"]["average"]["paper_average"] for r in runs)


def sweep_grid(suite: Suite, variant: str, done: dict[RunKey, dict]) -> list[float]:
    """Every learning rate the variant's sweep has a result for (its grid with any extensions)."""
    return sorted(
        {
            k.learning_rate
            for k in done
            if k.variant == variant and k.seed == suite.seeds[0] and k.learning_rate is not None
        }
    )


# -- run files and locks --------------------------------------------------------------------------------------
def result_path(results_dir: Path, suite: Suite, key: RunKey) -> Path:
    return results_dir / suite.key / f"{key.name}.json"


# Where a run lives (its folder, data and device), not what it trained on.
NOT_COMPARED = (*LOCATIONS, "training.use_cpu")


def load_done(suite: Suite, results_dir: Path) -> dict[RunKey, dict]:
    """Every finished run of the suite, by key. A run made under another config than the suite's now (another
    budget, say) stops the suite: it would be skipped as done and reported as this config's."""
    done = {}
    for path in sorted((results_dir / suite.key).glob("*.json")):
        record = json.loads(path.read_text())
        key = RunKey(record["variant"], record.get("learning_rate"), record["seed"])
        current = suite.config(key, Path()).to_dict()
        refuse_another_config(path, config_differences(record.get("config", {}), current, NOT_COMPARED))
        done[key] = record
    return done


def refuse_another_config(source: Path, differ: list[str]) -> None:
    """Stop, naming the settings that differ (``differ``), when ``source`` (a result file or a checkpoint) was made
    under another config than the suite's now."""
    if differ:
        raise SystemExit(
            f"[quality] {source} was made under another config than this suite's now ({'; '.join(differ[:6])}). "
            "Keep the two apart: run the changed suite with a fresh --results-dir and --runs-dir, or restore "
            "the config."
        )


def claim(path: Path) -> bool:
    """Take the lock file ``<run>.lock`` beside a result file; False when a live process holds it.

    A lock whose process is gone (a killed worker) is taken over.
    """
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _holder_alive(lock):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def _holder_alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text() or 0)
        os.kill(pid, 0)
    except (ValueError, FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return pid != os.getpid()


def release(path: Path) -> None:
    path.with_suffix(".lock").unlink(missing_ok=True)


# -- running --------------------------------------------------------------------------------------------------
def pending_runs(suite: Suite, variants: list[str], done: dict[RunKey, dict], failed: set[RunKey]) -> list[RunKey]:
    """What every variant needs next, sweep steps of all variants before any final seed; failed runs left out.

    A probe suite takes the variants' sweep runs in turns from the top of their grids: first every method at its
    shorter budget's rate (the runs that answer most on their own), then every method one step below, and so on."""
    plans = [variant_plan(suite, v, done) for v in variants if suite.runnable(v)]
    sweeps = [k for keys, chosen in plans if chosen is None for k in keys]
    if suite.probe:
        sweeps.sort(key=lambda k: (_steps_from_the_top(suite, k, done), variants.index(k.variant)))
    finals = [k for keys, chosen in plans if chosen is not None for k in keys]
    return [k for k in sweeps + finals if k not in failed]


def _steps_from_the_top(suite: Suite, key: RunKey, done: dict[RunKey, dict]) -> int:
    """How many rates of the variant's grid (with its extensions so far) lie above the run's."""
    grid = {*suite.grids[key.variant], *sweep_grid(suite, key.variant, done)}
    return sum(rate > key.learning_rate for rate in grid)


def run_suite(
    suite: Suite, variants: list[str], results_dir: Path, runs_dir: Path, start_by: datetime | None = None
) -> None:
    """Run what the suite needs until nothing is left: a run whose file exists is skipped, one another process
    holds is waited for, one that fails is reported and left out (its variant stops there). A run stopped by
    SIGTERM / Ctrl-C (after saving its checkpoint) stops the suite. After ``start_by`` (an aware datetime) no run
    starts: one that could not finish before the machine goes would be lost."""
    for variant in variants:
        if not suite.runnable(variant):
            print(
                f"[quality] {variant}: method {suite.sweep.config(variant).method.name!r} is not in pyramid_peft "
                f"({', '.join(method_choices())}); skipped",
                flush=True,
            )
    failed: set[RunKey] = set()
    while pending := pending_runs(suite, variants, load_done(suite, results_dir), failed):
        if start_by is not None and datetime.now(timezone.utc) > start_by:
            print(f"[quality] past {start_by.isoformat()}: no new run starts ({len(pending)} left)", flush=True)
            return
        claimed = next((k for k in pending if claim(result_path(results_dir, suite, k))), None)
        if claimed is None:
            print(f"[quality] {len(pending)} runs held by other workers; waiting", flush=True)
            time.sleep(LOCK_POLL_SECONDS)
            continue
        path = result_path(results_dir, suite, claimed)
        try:
            if not path.exists():  # another worker may have finished it since we listed it
                run_and_write(suite, claimed, path, runs_dir, failed)
        finally:
            release(path)


def run_and_write(suite: Suite, key: RunKey, path: Path, runs_dir: Path, failed: set[RunKey]) -> None:
    print(f"[quality] {suite.key} {key.name}: running", flush=True)
    try:
        record = run_one(suite, key, runs_dir)
    except TrainingInterrupted as stop:  # SIGTERM / Ctrl-C: the run saved a checkpoint; stop the suite too
        raise SystemExit(f"[quality] stopped: {stop}") from None
    except Exception:  # noqa: BLE001 - one failing run is reported; the suite goes on with the others
        print(f"[quality] {key.name} FAILED:\n{traceback.format_exc()}", flush=True)
        failed.add(key)
        return
    atomic_write_text(path, json.dumps(record, separators=(",", ":")) + "\n")
    flags = [t for t, r in record["reported"].items() if r["collapsed"]]
    print(
        f"[quality] {path.name}: validation {record['validation']['average']['paper_average']:.2f}, "
        f"{record['wall_seconds']:.0f} s" + (f"; WARNING: one class predicted on {flags}" if flags else ""),
        flush=True,
    )


def run_one(suite: Suite, key: RunKey, runs_dir: Path) -> dict:
    """Train (or, for the floor, only evaluate) one run; its record (see the module docstring)."""
    config = suite.config(key, runs_dir)
    trained = suite.trained(key.variant)
    machine = machine_info()
    checkpoint = last_checkpoint(config) if trained else None
    start = time.perf_counter()
    if trained:
        train_results = train_resumable(config, checkpoint)
        experiment = load_run(config.training["output_dir"])
    else:
        train_results, experiment = None, build_experiment(config)
    device = suite.device or ("cuda" if torch.cuda.is_available() and not config.training.get("use_cpu") else "cpu")
    experiment.model.to(device)  # load_run builds on the CPU
    trained_at = time.perf_counter()
    evaluation = evaluate_run_splits(experiment, train_results)
    done_at = time.perf_counter()
    return {
        "variant": key.variant,
        "seed": key.seed,
        "learning_rate": key.learning_rate,
        "method": config.method.name if trained else "none",
        "params": adapter_parameters(config) if trained else {},
        "metrics": {t: r["metrics"] for t, r in evaluation["reported"].items()},
        "average": average_scores({t: r["metrics"] for t, r in evaluation["reported"].items()}),
        **evaluation,
        "suite": suite.key,
        "steps": train_results.get("step", 0) if train_results else 0,
        "train_seconds": round(trained_at - start, 1),  # this sitting only, when resumed
        "eval_seconds": round(done_at - trained_at, 1),
        "wall_seconds": round(done_at - start, 1),
        "resumed_from": portable(checkpoint, runs_dir),
        "machine": {**machine, "device": device, "load_average_at_end": list(os.getloadavg())},
        "config": recorded_config_dict(config, runs_dir),
    }


def recorded_config_dict(config: ExperimentConfig, runs_dir: Path) -> dict:
    """The run's config as its record keeps it: the run folder made :func:`portable`."""
    recorded = config.to_dict()
    recorded["training"]["output_dir"] = portable(recorded["training"]["output_dir"], runs_dir)
    return recorded


def portable(path: str | None, runs_dir: Path) -> str | None:
    """A path under ``runs_dir`` as a record keeps it, naming no folder of the machine it ran on: relative to the
    working directory where it lies under it (the default ``runs/benchmarks/...``), else ``<runs-dir>/...``."""
    if path is None or not Path(path).is_absolute():
        return path
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(Path("<runs-dir>") / Path(path).relative_to(runs_dir.resolve()))


def last_checkpoint(config: ExperimentConfig) -> str | None:
    """The newest checkpoint an earlier sitting left in the run folder, if any; one trained under another config
    (another budget: resuming it would splice two schedules) stops the suite."""
    run_dir = Path(config.training["output_dir"])
    checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if checkpoint:  # the library's resume guard, asked before the run starts: a refusal stops the suite
        differ = resume_differences(checkpoint, recorded_config(config, run_dir).to_dict())
        refuse_another_config(Path(checkpoint) / WEIGHTS_CONFIG_FILE, differ)
    return checkpoint


def train_resumable(config: ExperimentConfig, checkpoint: str | None) -> dict:
    """``train(config)``, restarting from ``checkpoint`` (an earlier sitting's) when given."""
    if checkpoint:
        print(f"[quality] resuming from {checkpoint}", flush=True)
        config = replace(config, training={**config.training, "resume_from_checkpoint": checkpoint})
    return train(config)


def evaluate_run_splits(experiment, train_results: dict | None) -> dict:
    """``{"validation": ..., "reported": ...}``: per task its split, rows, fingerprint, metrics and collapse flag;
    the reported split also keeps every prediction and label (for the bootstrap).

    A trained run's validation metrics are those of the Trainer's final evaluation (``train_results``: under the
    selection protocol it evaluates the validation split), so only the reported split is predicted here; without
    ``train_results`` (the untuned floor) the adapter is disabled and both splits are predicted."""
    experiment.model.eval()
    splits = load_splits(experiment)
    setup = evaluation_setup(experiment, splits)
    predictor = Predictor.for_run(experiment.model, setup, experiment.config.training_arguments())
    if train_results is None:
        with experiment.peft_model.disable_adapter():
            return _evaluate_both(predictor, experiment, splits, None)
    return _evaluate_both(predictor, experiment, splits, train_results)


def _evaluate_both(predictor: Predictor, experiment, splits: list, train_results: dict | None) -> dict:
    validation = {}
    for eval_set in eval_sets(experiment, splits):
        if train_results is None:
            result = evaluate_set(predictor, eval_set)
            result.pop("collapsed")
        else:
            result = {**train_results["tasks"][eval_set.task.name], "fingerprint": fingerprint(eval_set.examples)}
        validation[eval_set.task.name] = result
    reported = {s.task.name: evaluate_set(predictor, s, keep=True) for s in eval_sets(experiment, splits, True)}
    return {
        "validation": {
            "average": average_scores({t: r["metrics"] for t, r in validation.items()}),
            "tasks": validation,
        },
        "reported": reported,
    }


def evaluate_set(predictor: Predictor, eval_set: EvalSet, keep: bool = False) -> dict:
    """One task's evaluation; with ``keep``, its predictions and labels in row order."""
    predictions = predictor.predict(eval_set, eval_set.examples)
    labels = [example["label"] for example in eval_set.examples]
    result = {
        "split": eval_set.split,
        "num_examples": len(labels),
        "fingerprint": fingerprint(eval_set.examples),
        "metrics": compute_metrics(eval_set.task, predictions, labels),
        "collapsed": collapsed(predictions, eval_set.task.is_regression),
    }
    if keep:
        result.update(predictions=predictions, labels=labels)
    return result


def fingerprint(examples: list[dict]) -> str:
    """SHA-256 of the rows (as sorted-key JSON, in order): the same rows give the same fingerprint in every run."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True).encode())
    return digest.hexdigest()


def adapter_parameters(config: ExperimentConfig) -> dict:
    """``count_parameters`` of the config's adapter (random weights), per task = total / number of tasks; for full
    fine-tuning, every weight of the model (heads left out, as for the adapters)."""
    experiment = build_experiment(config, random_init=True)
    if experiment.full:
        return full_parameter_count(experiment.peft_model, num_tasks=len(config.tasks))
    return count_parameters(experiment.peft_model, num_tasks=len(config.tasks))


# -- command line ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--methods", nargs="+", help="variants to run, in this order (default: all of the suite)")
    parser.add_argument("--smoke", action="store_true", help="2 learning rates, 2 steps, one task, LoRA + EPT")
    parser.add_argument("--results-dir", type=Path, help=f"per-run result files (default: {RESULTS_DIR})")
    parser.add_argument("--runs-dir", type=Path, help=f"run folders with checkpoints (default: {RUNS_DIR})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="where runs train and evaluate (default: a GPU if there is one)"
    )
    parser.add_argument(
        "--no-new-runs-after",
        type=aware_time,
        metavar="TIME",
        help="start no run after this ISO time (UTC unless it names a zone), e.g. 2026-12-07T04:55Z",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the suite (default 1)")
    parser.add_argument("--summarize-only", action="store_true", help="rebuild the report from the result files")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers
    return parser.parse_args(argv)


def aware_time(text: str) -> datetime:
    """An ISO 8601 time; one without a zone is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time: give e.g. 2026-12-07T04:55Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def smoke_overrides(suite_key: str) -> tuple[dict, dict]:
    """The smoke budget; a probe suite keeps its probe (two rates per variant) and may take its one step below."""
    tasks = SMOKE_TASKS[suite_key]
    benchmark = {**SMOKE_BENCHMARK, "tasks": tasks}
    if read_yaml(SUITES[suite_key].read_text())["benchmark"].get("probe"):
        benchmark = {k: v for k, v in benchmark.items() if k not in ("learning_rates", "max_extensions")}
    return {**SMOKE_SET, "tasks": tasks}, benchmark


def spawn_workers(argv: list[str], count: int) -> None:
    """Start ``count`` copies of this command (``argv`` less its ``--workers``) as single workers that write no
    report, and wait for all of them; they share the suite's runs through the lock files."""
    command = [sys.executable, str(Path(__file__).resolve()), *without_workers(argv), "--no-report"]
    workers = [subprocess.Popen(command) for _ in range(count)]
    codes = [worker.wait() for worker in workers]
    if any(codes):
        raise SystemExit(f"[quality] a worker failed (exit codes {codes})")


def without_workers(argv: list[str]) -> list[str]:
    """``argv`` without ``--workers N`` / ``--workers=N``."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--workers="):
            skip = False
        elif arg == "--workers":
            skip = True
        else:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shared, benchmark = smoke_overrides(args.suite) if args.smoke else ({}, {})
    suite = replace(load_suite(args.suite, shared, benchmark), device=args.device)
    default_dir = Path(tempfile.mkdtemp(prefix="quality-smoke-")) / "lr-selected" if args.smoke else RESULTS_DIR
    results_dir = args.results_dir or default_dir
    variants = args.methods or [v for v in suite.sweep.variants if not args.smoke or v in SMOKE_VARIANTS]
    unknown = [v for v in variants if v not in suite.sweep.variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; {args.suite} has {list(suite.sweep.variants)}.")
    runs_dir = args.runs_dir or (results_dir.parent / "runs" if args.smoke else RUNS_DIR)
    if not args.summarize_only and args.workers > 1:
        spawn_workers([*argv, "--results-dir", str(results_dir), "--runs-dir", str(runs_dir)], args.workers)
    elif not args.summarize_only:
        run_suite(suite, variants, results_dir, runs_dir, args.no_new_runs_after)
    if not args.no_report:  # the report reads this module, so it runs as its own script (no import circle)
        report = [sys.executable, str(Path(__file__).with_name("quality_report.py")), *argv]
        if subprocess.run([*report, "--results-dir", str(results_dir)]).returncode:
            raise SystemExit("[quality] the report failed (see above)")
        print(f"[quality] results in {results_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
