"""The twelve tasks of the EPT benchmarks (spec 4.1 GLUE on T5, 4.2 commonsense QA on LLaMA) by name."""

from __future__ import annotations

import difflib

from .spec import OPTION_LETTERS, TaskSpec

_SINGLE_SENTENCE = (("sentence", "sentence1"),)
_SENTENCE_PAIR = (("sentence1", "sentence1"), ("sentence2", "sentence2"))
_ENTAILMENT_WORDS = ("entailment", "not_entailment")


def _glue(name, label_words, fields, paper_metric="accuracy", metrics=("accuracy",), is_regression=False):
    return TaskSpec(name=name, family="glue", prompt_prefix=name, label_words=label_words,
                    paper_metric=paper_metric, metrics=metrics, fields=fields, is_regression=is_regression)


def _multiple_choice(name, prompt_prefix, num_options):
    return TaskSpec(name=name, family="commonsense", prompt_prefix=prompt_prefix,
                    label_words=OPTION_LETTERS[:num_options], paper_metric="accuracy", metrics=("accuracy",),
                    multiple_choice=True)


_TASKS = (
    _glue("cola", ("unacceptable", "acceptable"), _SINGLE_SENTENCE, paper_metric="mcc", metrics=("mcc",)),
    _glue("sst2", ("negative", "positive"), _SINGLE_SENTENCE),
    # The EPT/MoRE code reports accuracy for MRPC and QQP; F1 belongs to the full (HyperFormer) set.
    _glue("mrpc", ("not_equivalent", "equivalent"), _SENTENCE_PAIR, metrics=("accuracy", "f1")),
    _glue("qqp", ("not_duplicate", "duplicate"), (("question1", "sentence1"), ("question2", "sentence2")),
          metrics=("accuracy", "f1")),
    _glue("stsb", (), _SENTENCE_PAIR, paper_metric="pearson", metrics=("pearson", "spearman"), is_regression=True),
    # MNLI's prompt puts the hypothesis (sentence2) before the premise (sentence1).
    _glue("mnli", ("entailment", "neutral", "contradiction"), (("hypothesis", "sentence2"), ("premise", "sentence1"))),
    _glue("qnli", _ENTAILMENT_WORDS, (("question", "sentence1"), ("sentence", "sentence2"))),
    _glue("rte", _ENTAILMENT_WORDS, _SENTENCE_PAIR),
    TaskSpec(name="boolq", family="commonsense", prompt_prefix="boolq", label_words=("no", "yes"),
             paper_metric="accuracy", metrics=("accuracy",)),
    _multiple_choice("openbookqa", "openbookqa", num_options=4),
    # A handful of ARC items have 3 or 5 options; 5 letters cover them all.
    _multiple_choice("arc_easy", "arc", num_options=5),
    _multiple_choice("arc_challenge", "arc", num_options=5),
)
_REGISTRY = {task.name: task for task in _TASKS}

TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


class UnknownTaskError(ValueError):
    """Raised for a task name that is not in :data:`TASK_NAMES`."""


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` registered under ``name`` (case-insensitive)."""
    task = _REGISTRY.get(name.lower())
    if task is None:
        raise UnknownTaskError(_unknown_task_message(name))
    return task


def _unknown_task_message(name: str) -> str:
    message = f"Unknown task {name!r}. Known tasks: {', '.join(TASK_NAMES)}."
    closest = difflib.get_close_matches(name.lower(), TASK_NAMES, n=1)
    return f"{message} Did you mean {closest[0]!r}?" if closest else message
