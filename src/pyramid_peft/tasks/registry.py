"""The twelve tasks of the EPT benchmarks (GLUE on T5, commonsense QA on LLaMA; docs/tasks.md) by name.

Each task is one :class:`TaskSpec`: prompts, labels and metrics, and where its rows live (local files, hub copy).
:func:`register_task` adds another; everything downstream (data loading, splits, tables) reads the spec.
"""

from __future__ import annotations

import difflib

from .spec import OPTION_LETTERS, HubSource, LocalFiles, TaskSpec

_SINGLE_SENTENCE = (("sentence", "sentence1"),)
_SENTENCE_PAIR = (("sentence1", "sentence1"), ("sentence2", "sentence2"))
_ENTAILMENT_WORDS = ("entailment", "not_entailment")

_FULL_GLUE_FILES = (("train", "train.jsonl"), ("validation", "validation.jsonl"))
# MNLI and QQP ship a subset of train and 1000 rows held out from train instead of their official dev sets.
_SUBSET_GLUE_FILES = (("train", "train_subset.jsonl"), ("heldout", "heldout_from_train.jsonl"))
_GLUE_HUB_SPLITS = (("train", "train"), ("validation", "validation"))
_COMMONSENSE_FILES = (("train", "train.json"), ("test", "test.json"))
# LLM-Adapters' "test" is BoolQ's official dev set and the official test sets of OpenBookQA and ARC.
_QA_HUB_SPLITS = (("train", "train"), ("validation", "validation"), ("test", "test"))
# Commonsense prompts: "<prefix> [passage: ...] question: ... [choices: (A) ...]", the passage only where there is one.
_QA_FIELDS = (("passage", "passage"), ("question", "question"))
_QA_LAYOUT = {"fields": _QA_FIELDS, "optional_fields": ("passage",), "text_fields": ("question", "passage")}


def _glue(
    name,
    title,
    label_words,
    fields,
    hub_columns,
    paper_metric="accuracy",
    metrics=("accuracy",),
    is_regression=False,
    small=False,
    local_files=_FULL_GLUE_FILES,
    hub_splits=_GLUE_HUB_SPLITS,
):
    return TaskSpec(
        name=name,
        family="glue",
        prompt_prefix=name,
        label_words=label_words,
        paper_metric=paper_metric,
        metrics=metrics,
        fields=fields,
        kind="regression" if is_regression else "classification",
        title=title,
        small=small,
        local=LocalFiles(name, local_files),
        hub=HubSource("nyu-mll/glue", name, hub_splits, hub_columns),
    )


def _multiple_choice(name, title, prompt_prefix, num_options, folder, hub_path, hub_config, question_column):
    return TaskSpec(
        name=name,
        family="commonsense",
        prompt_prefix=prompt_prefix,
        label_words=OPTION_LETTERS[:num_options],
        paper_metric="accuracy",
        metrics=("accuracy",),
        kind="multiple_choice",
        title=title,
        **_QA_LAYOUT,
        local=LocalFiles(folder, _COMMONSENSE_FILES),
        hub=HubSource(hub_path, hub_config, _QA_HUB_SPLITS, (question_column,)),
    )


_TASKS = (
    _glue(
        "cola",
        "CoLA",
        ("unacceptable", "acceptable"),
        _SINGLE_SENTENCE,
        ("sentence",),
        paper_metric="mcc",
        metrics=("mcc",),
        small=True,
    ),
    _glue("sst2", "SST-2", ("negative", "positive"), _SINGLE_SENTENCE, ("sentence",)),
    # The EPT/MoRE code reports accuracy for MRPC and QQP; F1 belongs to the full (HyperFormer) set.
    _glue(
        "mrpc",
        "MRPC",
        ("not_equivalent", "equivalent"),
        _SENTENCE_PAIR,
        ("sentence1", "sentence2"),
        metrics=("accuracy", "f1"),
        small=True,
    ),
    _glue(
        "qqp",
        "QQP",
        ("not_duplicate", "duplicate"),
        (("question1", "sentence1"), ("question2", "sentence2")),
        ("question1", "question2"),
        metrics=("accuracy", "f1"),
        local_files=_SUBSET_GLUE_FILES,
    ),
    _glue(
        "stsb",
        "STS-B",
        (),
        _SENTENCE_PAIR,
        ("sentence1", "sentence2"),
        paper_metric="pearson",
        metrics=("pearson", "spearman"),
        is_regression=True,
        small=True,
    ),
    # MNLI's prompt puts the hypothesis (sentence2) before the premise (sentence1).
    _glue(
        "mnli",
        "MNLI",
        ("entailment", "neutral", "contradiction"),
        (("hypothesis", "sentence2"), ("premise", "sentence1")),
        ("premise", "hypothesis"),
        local_files=_SUBSET_GLUE_FILES,
        hub_splits=(
            ("train", "train"),
            ("validation", "validation_matched"),
            ("validation_mismatched", "validation_mismatched"),
        ),
    ),
    _glue(
        "qnli",
        "QNLI",
        _ENTAILMENT_WORDS,
        (("question", "sentence1"), ("sentence", "sentence2")),
        ("question", "sentence"),
        local_files=(("train", "train_subset.jsonl"), ("validation", "validation.jsonl")),
    ),
    _glue("rte", "RTE", _ENTAILMENT_WORDS, _SENTENCE_PAIR, ("sentence1", "sentence2"), small=True),
    TaskSpec(
        name="boolq",
        family="commonsense",
        prompt_prefix="boolq",
        label_words=("no", "yes"),
        paper_metric="accuracy",
        metrics=("accuracy",),
        kind="classification",
        title="BoolQ",
        **_QA_LAYOUT,
        local=LocalFiles("boolq", _COMMONSENSE_FILES),
        hub=HubSource("google/boolq", None, (("train", "train"), ("test", "validation")), ("question", "passage")),
    ),
    _multiple_choice(
        "openbookqa", "OBQA", "openbookqa", 4, "openbookqa", "allenai/openbookqa", "main", "question_stem"
    ),
    # A handful of ARC items have 3 or 5 options; 5 letters cover them all.
    _multiple_choice("arc_easy", "ARC-E", "arc", 5, "ARC-Easy", "allenai/ai2_arc", "ARC-Easy", "question"),
    _multiple_choice(
        "arc_challenge", "ARC-C", "arc", 5, "ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge", "question"
    ),
)
_REGISTRY = {task.name: task for task in _TASKS}

TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)  # the built-in tasks; registered ones come on top


class UnknownTaskError(ValueError):
    """Raised for a task name that is neither built in (:data:`TASK_NAMES`) nor registered."""


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` registered under ``name`` (case-insensitive)."""
    task = _REGISTRY.get(name.lower())
    if task is None:
        raise UnknownTaskError(_unknown_task_message(name))
    return task


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make ``spec`` known by its (lower-case) name to every part of the library; returns it.

    A name already registered is refused, so a definition cannot silently replace a built-in task.
    """
    if spec.name != spec.name.lower():
        raise ValueError(f"task names are lower case: register {spec.name.lower()!r}, not {spec.name!r}.")
    if spec.name in _REGISTRY:
        raise ValueError(f"task {spec.name!r} is registered already; give the new task another name.")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_task(name: str) -> None:
    """Forget a task added by :func:`register_task` (built-in tasks stay)."""
    if name in TASK_NAMES:
        raise ValueError(f"{name!r} is a built-in task and cannot be unregistered.")
    _REGISTRY.pop(name, None)


def _unknown_task_message(name: str) -> str:
    known = tuple(_REGISTRY)
    message = f"Unknown task {name!r}. Known tasks: {', '.join(known)}."
    closest = difflib.get_close_matches(name.lower(), known, n=1)
    return f"{message} Did you mean {closest[0]!r}?" if closest else message
