"""Train / evaluation / test splits of the two published protocols.

* ``"ept"`` (what the EPT/MoRE code does; docs/tasks.md): full train sets; evaluation on the second half of a seeded
  permutation of dev (seed 1189) for the small tasks CoLA, STS-B, MRPC and RTE, on the full dev set for the
  others (MNLI: matched). There is no separate test set: checkpoint selection and reporting share the data.
* ``"hyperformer"`` (arXiv 2106.04489): small tasks split dev in two halves (seed 42), validation and test; large tasks
  move 1000 training rows to validation and test on dev; MNLI validates on mismatched and tests on matched.
* ``"selection"`` (this project's benchmarks, for choosing hyperparameters honestly): a validation split carved
  from train (``min(1000, n_train // 5)`` rows of a seed-2026 permutation, the same rows whatever the run's
  seed or method) is the evaluation set used to choose; the model trains on the rest; the reported split (the
  test split) is the whole dev set, never used to choose anything. Where dev is missing locally (MNLI, QQP), the
  held-out stand-in (1000 rows) is topped up to 2000 with rows carved from train before the validation rows, so
  that the three parts stay disjoint.

Which tasks are "small" (CoLA, STS-B, MRPC, RTE) is part of each task's definition (``TaskSpec.small``).

Permutations come from ``torch.randperm`` with a ``torch.Generator`` seeded with the protocol's seed, the
generator both reference codebases use, so the same rows are selected when dev is in the hub's order.

Commonsense tasks ignore the protocol: they train on train and evaluate on the LLM-Adapters test file, and the
split is called "test" because that is what it is.

The local data folder has no official dev set for MNLI and QQP, only 1000 rows held out from train. Where a
protocol needs that dev set, the held-out rows stand in for it, and the split name says "held-out" so that no
report can mistake them for dev.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from ..tasks import TaskSpec, get_task
from .location import DataSourceError, resolve_data_dir
from .sources import load_examples, local_split_path

PROTOCOLS = ("ept", "hyperformer", "selection")
EPT_SEED = 1189
HYPERFORMER_SEED = 42
HYPERFORMER_VALIDATION_SIZE = 1000
SELECTION_SEED = 2026
SELECTION_VALIDATION_SIZE = 1000  # at most; and at most a fifth of train
SELECTION_MIN_REPORTED = 2000  # rows in a large task's reported split
# Deliberately free of "dev" and "validation": these rows come from train.
HELDOUT_SPLIT_NAME = "held-out from train (local stand-in)"
_MISMATCHED = "validation_mismatched"


@dataclass(frozen=True)
class TaskSplits:
    """The examples a run trains on, evaluates on during training, and (HyperFormer only) tests on at the end.

    ``eval_split`` and ``test_split`` are human-readable descriptions of where the rows came from, for logs and
    reports, e.g. ``"validation[second half, seed 1189]"``.
    """

    train: list[dict]
    eval: list[dict]
    eval_split: str
    test: list[dict] | None = None
    test_split: str | None = None


def build_splits(
    task: TaskSpec | str,
    protocol: str = "ept",
    data_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    max_eval: int | None = None,
    config_dir: str | os.PathLike | None = None,
) -> TaskSplits:
    """The splits of ``task`` under ``protocol`` (``"ept"`` or ``"hyperformer"``).

    A task declared in a config ignores the protocol (:func:`_declared_splits`); ``config_dir`` is where its
    relative paths are looked up last. A task's ``max_train_rows`` keeps that many training rows (a seeded sample).
    ``seed`` overrides the protocol's permutation seed (1189 for EPT, 42 for HyperFormer, 2026 for selection).
    ``max_eval`` keeps only the first ``max_eval`` evaluation rows after the protocol's selection, for quick runs
    (under ``"selection"``, the first ``max_eval`` test rows too).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown split protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}.")
    if max_eval is not None and max_eval < 1:
        raise ValueError(f"max_eval must be a positive number of rows or None, got {max_eval}.")
    spec = get_task(task) if isinstance(task, str) else task
    if spec.family == "declared":
        splits = _declared_splits(spec, data_dir, config_dir, _or(seed, SELECTION_SEED))
        return _cap_train(_cap_test(_cap_eval(splits, max_eval), max_eval), spec.max_train_rows)
    if protocol == "selection":
        splits = _selection_splits(spec, data_dir, _or(seed, SELECTION_SEED))
        return _cap_train(_cap_test(_cap_eval(splits, max_eval), max_eval), spec.max_train_rows)
    if spec.family == "commonsense":
        splits = TaskSplits(
            load_examples(spec.name, "train", data_dir), load_examples(spec.name, "test", data_dir), "test"
        )
    elif protocol == "ept":
        splits = _ept_splits(spec, data_dir, _or(seed, EPT_SEED))
    else:
        splits = _hyperformer_splits(spec, data_dir, _or(seed, HYPERFORMER_SEED))
    return _cap_train(_cap_eval(splits, max_eval), spec.max_train_rows)


def _or(seed: int | None, default: int) -> int:
    return default if seed is None else seed


def _ept_splits(spec: TaskSpec, data_dir, seed: int) -> TaskSplits:
    train = load_examples(spec.name, "train", data_dir)
    dev, dev_name = _dev_or_heldout(spec, "validation", data_dir)
    if not spec.small:
        return TaskSplits(train, dev, dev_name)
    _, second_half = _halves(dev, seed)
    return TaskSplits(train, second_half, f"{dev_name}[second half, seed {seed}]")


def _hyperformer_splits(spec: TaskSpec, data_dir, seed: int) -> TaskSplits:
    train = load_examples(spec.name, "train", data_dir)
    dev, dev_name = _dev_or_heldout(spec, "validation", data_dir)
    if spec.small:
        first_half, second_half = _halves(dev, seed)
        return TaskSplits(
            train,
            first_half,
            f"{dev_name}[first half, seed {seed}]",
            second_half,
            f"{dev_name}[second half, seed {seed}]",
        )
    has_mismatched = _MISMATCHED in spec.splits
    if has_mismatched and not _local_dev_missing(spec.name, _MISMATCHED, data_dir):
        return TaskSplits(train, load_examples(spec.name, _MISMATCHED, data_dir), _MISMATCHED, dev, dev_name)
    order = _permutation(len(train), seed)
    validation = [train[i] for i in order[:HYPERFORMER_VALIDATION_SIZE]]
    remaining_train = [train[i] for i in order[HYPERFORMER_VALIDATION_SIZE:]]
    validation_name = f"train[{len(validation)} rows, seed {seed}]"
    if has_mismatched:
        validation_name += " (local stand-in for the mismatched split)"
    return TaskSplits(remaining_train, validation, validation_name, dev, dev_name)


def _selection_splits(spec: TaskSpec, data_dir, seed: int) -> TaskSplits:
    """Train minus a carved validation split (evaluated, to choose) and the reported split (test, never chosen on).

    Positions of one seeded permutation of train: first the rows that top a local held-out stand-in up to
    :data:`SELECTION_MIN_REPORTED`, then ``min(1000, n // 5)`` validation rows; the model trains on the rest.
    """
    train = load_examples(spec.name, "train", data_dir)
    reported, reported_name = _reported_split(spec, data_dir)
    order = _permutation(len(train), seed)
    top_up = max(0, SELECTION_MIN_REPORTED - len(reported)) if reported_name == HELDOUT_SPLIT_NAME else 0
    size = min(SELECTION_VALIDATION_SIZE, (len(train) - top_up) // 5)
    if top_up:
        reported = reported + [train[i] for i in order[:top_up]]
        reported_name += f" + train[{top_up} rows, seed {seed}]"
    validation = [train[i] for i in order[top_up : top_up + size]]
    remaining = [train[i] for i in order[top_up + size :]]
    after = f" after {top_up}" if top_up else ""
    validation_name = f"train[{size} rows{after}, seed {seed}] (validation carved from train)"
    return TaskSplits(remaining, validation, validation_name, reported, reported_name)


def _declared_splits(spec: TaskSpec, data_dir, config_dir, seed: int) -> TaskSplits:
    """A declared task's splits: its validation file, or ``min(1000, n // 5)`` rows carved from train (positions of
    a seed-2026 permutation, as the selection protocol carves) that it then does not train on; its test file if any.
    """
    train = load_examples(spec, "train", data_dir, config_dir)
    test = load_examples(spec, "test", data_dir, config_dir) if "test" in spec.splits else None
    test_name = "test" if test is not None else None
    if "validation" in spec.splits:
        return TaskSplits(train, load_examples(spec, "validation", data_dir, config_dir), "validation", test, test_name)
    size = min(SELECTION_VALIDATION_SIZE, len(train) // 5)
    if size == 0:
        raise DataSourceError(
            f"task {spec.name!r}: field 'data.validation' is not given and train has {len(train)} rows, too few to "
            "carve a validation split from (a fifth of train, at least one row). Fix: add rows or a validation file."
        )
    order = _permutation(len(train), seed)
    validation = [train[i] for i in order[:size]]
    remaining = [train[i] for i in sorted(order[size:])]
    name = f"train[{size} rows, seed {seed}] (validation carved from train)"
    return TaskSplits(remaining, validation, name, test, test_name)


def _reported_split(spec: TaskSpec, data_dir) -> tuple[list[dict], str]:
    """The whole split a benchmark reports: dev (or its local stand-in) for GLUE, the test file for commonsense."""
    if spec.family == "commonsense":
        return load_examples(spec.name, "test", data_dir), "test"
    return _dev_or_heldout(spec, "validation", data_dir)


def _dev_or_heldout(spec: TaskSpec, split: str, data_dir) -> tuple[list[dict], str]:
    """The official dev ``split`` and its name (the hub's, e.g. MNLI's ``validation_matched``), or the local
    held-out rows (named so) where dev is absent."""
    if _local_dev_missing(spec.name, split, data_dir):
        return load_examples(spec.name, "heldout", data_dir), HELDOUT_SPLIT_NAME
    hub_name = spec.hub.hub_split(split) if spec.hub else None
    return load_examples(spec.name, split, data_dir), hub_name or split


def _local_dev_missing(task: str, split: str, data_dir) -> bool:
    """True when a local folder is in use, lacks the dev ``split`` of ``task``, and has held-out rows instead."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return False
    dev_path = local_split_path(task, split, root)
    heldout_path = local_split_path(task, "heldout", root)
    return (dev_path is None or not dev_path.is_file()) and heldout_path is not None and heldout_path.is_file()


def _permutation(size: int, seed: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()


def _halves(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Rows at the first ``n // 2`` and the remaining positions of a seeded permutation."""
    order = _permutation(len(rows), seed)
    middle = len(rows) // 2
    return [rows[i] for i in order[:middle]], [rows[i] for i in order[middle:]]


def _cap_eval(splits: TaskSplits, max_eval: int | None) -> TaskSplits:
    if max_eval is None or len(splits.eval) <= max_eval:
        return splits
    return replace(splits, eval=splits.eval[:max_eval], eval_split=f"{splits.eval_split} (first {max_eval} rows)")


def _cap_train(splits: TaskSplits, max_rows: int | None) -> TaskSplits:
    """At most ``max_rows`` training rows: those at the first positions of a seed-2026 permutation, in file order."""
    if max_rows is None or len(splits.train) <= max_rows:
        return splits
    keep = sorted(_permutation(len(splits.train), SELECTION_SEED)[:max_rows])
    return replace(splits, train=[splits.train[i] for i in keep])


def _cap_test(splits: TaskSplits, max_eval: int | None) -> TaskSplits:
    if max_eval is None or splits.test is None or len(splits.test) <= max_eval:
        return splits
    return replace(splits, test=splits.test[:max_eval], test_split=f"{splits.test_split} (first {max_eval} rows)")
