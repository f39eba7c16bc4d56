"""Uncertainty of benchmark averages: bootstrap intervals, a paired verdict between two methods, collapse flags.

A *run* is one seed of one method: per task, its predictions on the task's evaluation examples. A method's score
is the suite's average: the mean over tasks of each task's paper metric (x100), averaged over seeds,

    score = 1/S sum_s 1/T sum_t metric_t(predictions[s][t], labels[t]).

Its uncertainty has two sources, the finite evaluation sets and the seed, and the bootstrap resamples both: one
replicate draws, per task, n_t examples with replacement (the same examples for every seed), and S seeds with
replacement, and recomputes the score. The 95% interval is the 2.5 / 97.5 percentiles of the replicates.

The paired verdict compares two methods evaluated on the same examples: each replicate draws the examples once
for both, and the seeds once for both when both ran the same seeds (the runs of one seed train on the same
batches), and takes the difference of the two scores. An interval above 0 says "better", below 0 "worse",
otherwise "no significant difference".

Predictions follow :mod:`pyramid_peft.metrics`: a None (an unparseable generation) counts as wrong, replaced by
``1 - label`` for classification and 0.0 for regression, before any resampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
BETTER, SAME, WORSE = "better", "no significant difference", "worse"


@dataclass(frozen=True)
class TaskRuns:
    """One task's evaluation: its paper metric, labels, and every seed's predictions (rows in label order)."""

    metric: str  # accuracy, mcc, f1 or pearson
    labels: Sequence[float]
    predictions: Sequence[Sequence]  # [seed][example]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(predictions [seeds, n], labels [n]) as float arrays, with None replaced as :mod:`metrics` does."""
        labels = np.asarray(self.labels, dtype=np.float64)
        regression = self.metric == "pearson"
        rows = [
            [p if p is not None else 0.0 if regression else 1 - y for p, y in zip(row, labels)]
            for row in self.predictions
        ]
        predictions = np.asarray(rows, dtype=np.float64)
        if predictions.ndim != 2 or predictions.shape[1] != labels.shape[0] or not labels.size:
            raise ValueError(f"every seed needs one prediction per label ({labels.shape[0]}), got {predictions.shape}.")
        return predictions, labels


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Verdict:
    """Method A against method B: the difference of their scores (A - B), its interval and what it says."""

    difference: Interval
    word: str  # BETTER, SAME or WORSE


# -- metrics over many resamples at once ---------------------------------------------------------------------
def metric_rows(metric: str, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``metric`` (x100) of each row of ``predictions`` [rows, n] against the matching row of ``labels`` [rows, n].

    accuracy: share of equal values. f1: 2 tp / (2 tp + fp + fn) of class 1 (0 without a true positive).
    mcc: (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), with c correct, s examples, p_k / t_k
    predicted / true counts of class k (0 where undefined). pearson: correlation (0 where a row is constant).
    """
    if metric == "accuracy":
        return 100.0 * (predictions == labels).mean(-1)
    if metric == "f1":
        tp = ((predictions == 1) & (labels == 1)).sum(-1)
        wrong = ((predictions == 1) != (labels == 1)).sum(-1)
        return 100.0 * np.where(tp > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)
    if metric == "mcc":
        return 100.0 * _mcc_rows(predictions, labels)
    if metric == "pearson":
        return 100.0 * _pearson_rows(predictions, labels)
    raise ValueError(f"no resampled form of metric {metric!r}; use accuracy, f1, mcc or pearson.")


def _mcc_rows(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    classes = np.unique(np.concatenate([np.unique(predictions), np.unique(labels)]))
    predicted = np.stack([(predictions == k).sum(-1) for k in classes], -1).astype(np.float64)
    true = np.stack([(labels == k).sum(-1) for k in classes], -1).astype(np.float64)
    correct = (predictions == labels).sum(-1).astype(np.float64)
    total = float(labels.shape[-1])
    numerator = correct * total - (predicted * true).sum(-1)
    denominator = np.sqrt((total**2 - (predicted**2).sum(-1)) * (total**2 - (true**2).sum(-1)))
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)


def _pearson_rows(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    x = predictions - predictions.mean(-1, keepdims=True)
    y = labels - labels.mean(-1, keepdims=True)
    defined = (np.ptp(predictions, -1) > 0) & (np.ptp(labels, -1) > 0)
    squares = (x**2).sum(-1) * (y**2).sum(-1)
    if (defined & (squares < np.finfo(np.float64).tiny)).any():
        # Tiny distinct values (1e-303) square to 0 or to subnormals: scale each row to unit magnitude first, which
        # leaves the correlation as it is. Only then, so that results computed without it stay bit for bit.
        x, y = _unit_rows(x), _unit_rows(y)
        squares = (x**2).sum(-1) * (y**2).sum(-1)
    return np.where(defined, (x * y).sum(-1) / np.where(defined, np.sqrt(squares), 1.0), 0.0)


def _unit_rows(values: np.ndarray) -> np.ndarray:
    largest = np.abs(values).max(-1, keepdims=True)
    return values / np.where(largest > 0, largest, 1.0)


# -- the bootstrap -------------------------------------------------------------------------------------------
def score(tasks: Sequence[TaskRuns]) -> float:
    """The method's average: mean over seeds and tasks of each task's metric on all its examples."""
    per_task = []
    for task in tasks:
        predictions, labels = task.arrays()
        per_task.append(metric_rows(task.metric, predictions, np.broadcast_to(labels, predictions.shape)).mean())
    return float(np.mean(per_task))


def _example_draws(tasks: Sequence[TaskRuns], resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.integers(0, len(task.labels), size=(resamples, len(task.labels)), dtype=np.int32) for task in tasks]


def _seed_scores(tasks: Sequence[TaskRuns], draws: list[np.ndarray]) -> np.ndarray:
    """[resamples, seeds]: each seed's average over tasks on each replicate's examples."""
    total = 0.0
    for task, index in zip(tasks, draws):
        predictions, labels = task.arrays()
        total = total + np.stack([metric_rows(task.metric, row[index], labels[index]) for row in predictions], -1)
    return total / len(tasks)


def _replicates(tasks: Sequence[TaskRuns], draws: list[np.ndarray], seed_draws: np.ndarray) -> np.ndarray:
    """Each replicate's score: the mean of its drawn seeds' averages."""
    per_seed = _seed_scores(tasks, draws)
    return np.take_along_axis(per_seed, seed_draws, axis=1).mean(-1)


def _num_seeds(tasks: Sequence[TaskRuns]) -> int:
    counts = {len(task.predictions) for task in tasks}
    if len(counts) != 1:
        raise ValueError(f"every task needs the same seeds; got {sorted(counts)} seeds across tasks.")
    return counts.pop()


def _interval(estimate: float, replicates: np.ndarray) -> Interval:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def bootstrap_score(tasks: Sequence[TaskRuns], resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
    """The method's score and its 95% percentile-bootstrap interval (examples within tasks, and seeds)."""
    rng = np.random.default_rng(seed)
    seeds = _num_seeds(tasks)
    draws = _example_draws(tasks, resamples, rng)
    seed_draws = rng.integers(0, seeds, size=(resamples, seeds))
    return _interval(score(tasks), _replicates(tasks, draws, seed_draws))


def paired_verdict(
    mine: Sequence[TaskRuns],
    theirs: Sequence[TaskRuns],
    same_seeds: bool,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Verdict:
    """``mine`` against ``theirs`` on the same tasks and examples: the score difference, its interval, the word.

    ``same_seeds``: both ran the same seeds (in the same order), so each replicate draws the same seeds for both.
    """
    if [t.metric for t in mine] != [t.metric for t in theirs] or any(
        not np.array_equal(np.asarray(a.labels, float), np.asarray(b.labels, float)) for a, b in zip(mine, theirs)
    ):
        raise ValueError("a paired comparison needs the same tasks, metrics and labels (the same evaluation rows).")
    rng = np.random.default_rng(seed)
    draws = _example_draws(mine, resamples, rng)
    my_seeds, their_seeds = _num_seeds(mine), _num_seeds(theirs)
    my_draws = rng.integers(0, my_seeds, size=(resamples, my_seeds))
    if same_seeds and my_seeds != their_seeds:
        raise ValueError(f"same_seeds, but {my_seeds} seeds against {their_seeds}.")
    their_draws = my_draws if same_seeds else rng.integers(0, their_seeds, size=(resamples, their_seeds))
    difference = _replicates(mine, draws, my_draws) - _replicates(theirs, draws, their_draws)
    interval = _interval(score(mine) - score(theirs), difference)
    word = BETTER if interval.low > 0 else WORSE if interval.high < 0 else SAME
    return Verdict(interval, word)


# -- collapse ------------------------------------------------------------------------------------------------
def collapsed(predictions: Sequence, is_regression: bool) -> bool:
    """A classification run collapsed on a task when it predicts one and the same class for every example."""
    return not is_regression and len(predictions) > 0 and len(set(predictions)) == 1
