"""Task metrics, computed offline with numpy, scipy, scikit-learn, and for generated text rouge-score and sacrebleu.

The metric functions take parsed predictions (label ids, floats for regression, texts for generation, as returned
by :meth:`TaskSpec.parse_prediction`) and references, and return values in their natural range ([0, 1] or
[-1, 1]). :func:`compute_metrics` scales them by 100, as papers report them.

Generated text: ``exact_match`` after SQuAD's normalisation (lower case, no punctuation, no articles a / an / the,
white space collapsed; Rajpurkar et al. 2016, arXiv:1606.05250), ``rouge_l`` the mean ROUGE-L F-measure of
``rouge-score`` (Lin 2004, with its stemmer), ``chrf`` the corpus chrF of ``sacrebleu`` (Popovic 2015).

A prediction of None (a generation that matched no label) always counts as wrong: for accuracy, MCC and F1 it
is replaced by ``1 - reference``, which differs from the reference for every integer label and is the other
class of a binary task (HyperFormer's rule for F1). For STS-B it becomes 0.0, as the EPT/MoRE code does.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

from .tasks import TaskSpec, get_task

Prediction = int | float | None
_PUNCTUATION = frozenset(string.punctuation)


def accuracy(predictions: Sequence[Prediction], references: Sequence[int]) -> float:
    """The fraction of predictions equal to their reference."""
    return float(np.mean([p == r for p, r in zip(predictions, _checked(references, predictions))]))


def matthews_corr(predictions: Sequence[Prediction], references: Sequence[int]) -> float:
    """Matthews correlation coefficient; 0.0 when it is undefined (a constant prediction or reference)."""
    return float(sk_metrics.matthews_corrcoef(references, _wrong_if_none(predictions, references)))


def f1_binary(predictions: Sequence[Prediction], references: Sequence[int]) -> float:
    """F1 of the positive class (label 1); 0.0 when there is no true positive."""
    return float(
        sk_metrics.f1_score(
            references, _wrong_if_none(predictions, references), pos_label=1, average="binary", zero_division=0
        )
    )


def f1_macro(predictions: Sequence[Prediction], references: Sequence[int]) -> float:
    """F1 averaged over the classes that occur in references or predictions (unweighted)."""
    return float(
        sk_metrics.f1_score(references, _wrong_if_none(predictions, references), average="macro", zero_division=0)
    )


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and the articles a / an / the removed, white space
    collapsed."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def exact_match(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """The fraction of generated texts equal to their reference after :func:`normalize_answer`."""
    pairs = zip(predictions, _checked(references, predictions))
    return float(np.mean([normalize_answer(p or "") == normalize_answer(r) for p, r in pairs]))


def rouge_l(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words) of ``rouge-score``, with its Porter stemmer."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = zip(predictions, _checked(references, predictions))
    return float(np.mean([scorer.score(r, p or "")["rougeL"].fmeasure for p, r in pairs]))


def chrf(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Corpus chrF (character n-gram F-score, n <= 6, beta 2) of ``sacrebleu``, in [0, 1]."""
    from sacrebleu.metrics import CHRF

    references = _checked(references, predictions)
    return float(CHRF().corpus_score([p or "" for p in predictions], [list(references)]).score / 100.0)


def pearson(predictions: Sequence[Prediction], references: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when it is undefined (constant predictions, e.g. early in training)."""
    return _correlation(stats.pearsonr, predictions, references)


def spearman(predictions: Sequence[Prediction], references: Sequence[float]) -> float:
    """Spearman rank correlation; 0.0 when it is undefined."""
    return _correlation(stats.spearmanr, predictions, references)


METRICS: dict[str, Callable[[Sequence[Prediction], Sequence], float]] = {
    "accuracy": accuracy,
    "mcc": matthews_corr,
    "f1": f1_binary,
    "f1_macro": f1_macro,
    "pearson": pearson,
    "spearman": spearman,
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "chrf": chrf,
}


def compute_metrics(task: TaskSpec | str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Every metric of ``task.metrics``, times 100, plus ``"paper"``: the first one, which averages over tasks
    (for the built-in tasks, the one the EPT paper reports).

    Predictions may be parsed values or raw generated strings, which are parsed with ``task.parse_prediction``.
    """
    spec = get_task(task) if isinstance(task, str) else task
    parsed = [spec.parse_prediction(p) if isinstance(p, str) else p for p in predictions]
    scores = {name: 100.0 * METRICS[name](parsed, references) for name in spec.metrics}
    scores["paper"] = scores[spec.paper_metric]
    return scores


def average_scores(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted averages over tasks of :func:`compute_metrics` results.

    ``paper_average`` is the mean of the tasks' ``"paper"`` values (the EPT tables' average).
    ``full_average`` first averages each task's full metric set (the keys that name a metric), then averages
    over tasks (HyperFormer's ``average_metrics``).
    """
    if not per_task:
        raise ValueError("average_scores needs the scores of at least one task.")
    full_means = [np.mean([value for name, value in scores.items() if name in METRICS]) for scores in per_task.values()]
    return {
        "paper_average": float(np.mean([scores["paper"] for scores in per_task.values()])),
        "full_average": float(np.mean(full_means)),
    }


def _checked(references: Sequence, predictions: Sequence) -> Sequence:
    if len(references) != len(predictions) or not references:
        raise ValueError(
            f"Need as many predictions as references, and at least one: got {len(predictions)} "
            f"predictions and {len(references)} references."
        )
    return references


def _wrong_if_none(predictions: Sequence[Prediction], references: Sequence[int]) -> list[int]:
    return [1 - r if p is None else p for p, r in zip(predictions, _checked(references, predictions))]


def _correlation(statistic, predictions: Sequence[Prediction], references: Sequence[float]) -> float:
    values = np.array([0.0 if p is None else p for p in predictions], dtype=np.float64)
    references = np.asarray(_checked(references, predictions), dtype=np.float64)
    if np.ptp(values) == 0 or np.ptp(references) == 0:
        return 0.0
    return float(statistic(values, references)[0])
