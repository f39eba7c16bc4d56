"""What a task is: its label space, its metrics, and how one example becomes model input.

Examples are plain dicts, the same whatever the data came from:

* GLUE: ``{"idx": int, "sentence1": str, "sentence2": str | None, "label": int | float}``
  (MNLI: sentence1 = premise, sentence2 = hypothesis; QNLI: sentence1 = question, sentence2 = sentence);
* commonsense QA: ``{"question": str, "passage": str, "choices": list[str], "label": int}``, where
  ``label`` indexes ``choices`` (BoolQ: ``choices == ["no", "yes"]``, so label 1 means "yes").

Three renderings serve the three kinds of model the library trains:

* :meth:`TaskSpec.to_text_to_text` for T5: the EPT/MoRE prompts and label words (docs/tasks.md);
* :meth:`TaskSpec.to_causal_lm` for decoder-only models: the same prompt with an answer cue;
* :meth:`TaskSpec.to_classification` for encoder heads: text pair plus a label id (or float for STS-B).

Where a task's rows live is part of its definition too: :class:`LocalFiles` (the offline data folder's layout) and
:class:`HubSource` (the Hugging Face hub copy), so that adding a task is one :class:`TaskSpec` plus its data.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Literal

ANSWER_CUE = "\nAnswer:"
OPTION_LETTERS = tuple(string.ascii_uppercase)
_TRAILING_PUNCTUATION = ".!,?:;"


@dataclass(frozen=True)
class LocalFiles:
    """Where a local data folder keeps a task: ``<data_dir>/<family>/<folder>/<file>`` for each split.

    Args:
        folder: the task's folder under the family's folder (``"ARC-Easy"``).
        files: ``(split, file name)`` pairs, e.g. ``(("train", "train.jsonl"), ("validation", "validation.jsonl"))``;
            a split without a file is not available locally.
    """

    folder: str
    files: tuple[tuple[str, str], ...]

    def file_name(self, split: str) -> str | None:
        """The file that holds ``split``, or None where the local layout has no such split."""
        return dict(self.files).get(split)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.files)


@dataclass(frozen=True)
class HubSource:
    """Where the Hugging Face hub keeps a task, and which of its columns hold the text.

    Args:
        path: dataset id, e.g. ``"nyu-mll/glue"``.
        config: dataset configuration (``"rte"``), or None.
        splits: ``(our split name, the hub's)`` pairs, e.g. ``(("validation", "validation_matched"),)``.
        columns: the text columns: GLUE, the first and (sentence pairs) second sentence, e.g.
            ``("premise", "hypothesis")``; multiple choice, the question (``("question_stem",)``); yes / no
            questions, the question and the passage.
    """

    path: str
    config: str | None
    splits: tuple[tuple[str, str], ...]
    columns: tuple[str, ...]

    def hub_split(self, split: str) -> str | None:
        """The hub's name for our ``split``, or None where the hub copy has no such split."""
        return dict(self.splits).get(split)

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(ours for ours, _ in self.splits)


@dataclass(frozen=True)
class TaskSpec:
    """One task of the benchmark suite.

    Args:
        name: registry key, e.g. ``"rte"``.
        family: ``"glue"`` or ``"commonsense"``.
        prompt_prefix: the word that opens every prompt (``"arc"`` for both ARC sets).
        label_words: text-to-text targets indexed by label id; ``()`` for the regression task STS-B.
        paper_metric: the single number the EPT paper reports for this task.
        metrics: the full metric set (HyperFormer's convention), ``paper_metric`` included.
        fields: GLUE only: ``(tag, example key)`` pairs in prompt order, e.g. ``(("hypothesis", "sentence2"), ...)``.
        is_regression: True for STS-B, whose label is a float score in [0, 5].
        multiple_choice: True when the prompt lists lettered options and the target is a letter.
        title: how tables name the task (``"SST-2"``); default: the name.
        small: one of the small tasks whose dev set the split protocols cut in halves (CoLA, STS-B, MRPC, RTE).
        local: the task's files in a local data folder (None: none there).
        hub: the task's Hugging Face hub copy (None: local data only).
    """

    name: str
    family: Literal["glue", "commonsense"]
    prompt_prefix: str
    label_words: tuple[str, ...]
    paper_metric: str
    metrics: tuple[str, ...]
    fields: tuple[tuple[str, str], ...] = ()
    is_regression: bool = False
    multiple_choice: bool = False
    title: str = ""
    small: bool = False
    local: LocalFiles | None = None
    hub: HubSource | None = None

    @property
    def display_name(self) -> str:
        """The task's name in tables: its ``title``, else its ``name``."""
        return self.title or self.name

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split name that the local layout or the hub copy knows, local first."""
        local = self.local.splits if self.local else ()
        hub = self.hub.split_names if self.hub else ()
        return tuple(dict.fromkeys((*local, *hub)))

    @property
    def num_labels(self) -> int:
        """Width of a classification head: 1 for regression, else the number of label words.

        Multiple-choice tasks are framed as classification over option *positions*, so this is the largest
        number of options any item has (5 for ARC, whose few 5-option items use the letter E).
        """
        return 1 if self.is_regression else len(self.label_words)

    def to_text_to_text(self, example: dict) -> tuple[str, str]:
        """The (source, target) strings of the EPT/MoRE text-to-text format."""
        return self._source(example), self._target(example)

    def to_causal_lm(self, example: dict) -> tuple[str, str]:
        """The (prompt, answer) strings for a decoder-only model; the loss later goes on the answer only.

        The prompt is the text-to-text source followed by ``"\\nAnswer:"``; the answer is the target with a
        leading space, so that prompt + answer reads "...\\nAnswer: entailment".
        """
        source, target = self.to_text_to_text(example)
        return source + ANSWER_CUE, " " + target

    def to_classification(self, example: dict) -> tuple[str, str | None, int | float]:
        """The (text_a, text_b, label) triple for an encoder with a classification or regression head.

        GLUE: the two sentences in dataset order (text_b is None for single-sentence tasks).
        Multiple choice: text_a is the question, text_b the lettered options ``"(A) ... (B) ..."``, and the
        label is the index of the correct option. BoolQ: text_a is the question, text_b the passage (None
        when the data has no passage).
        """
        if self.family == "glue":
            return example["sentence1"], example["sentence2"], example["label"]
        if self.multiple_choice:
            return example["question"], _lettered_options(example["choices"]), example["label"]
        return example["question"], example["passage"] or None, example["label"]

    def parse_prediction(self, text: str) -> int | float | None:
        """Map a generated string back to a label id (a float for STS-B), or None when it matches nothing.

        Only the first line counts (a causal LM may keep generating); it is stripped, lowercased and loses
        trailing ``.!,?:;``. It must then *be* a label word (a letter, optionally with an opening and / or closing
        parenthesis, for multiple choice), or a finite number for STS-B. Nothing is searched for inside longer text.
        """
        lines = text.strip().splitlines()
        answer = lines[0].strip().lower().rstrip(_TRAILING_PUNCTUATION).strip() if lines else ""
        if self.is_regression:
            return _parse_finite_float(answer)
        if self.multiple_choice:  # "(b)", and "(b" / "b)" cut by the token budget or written so
            answer = answer.removeprefix("(").removesuffix(")").strip()
        label_ids = {word.lower(): label_id for label_id, word in enumerate(self.label_words)}
        return label_ids.get(answer)

    def _source(self, example: dict) -> str:
        if self.family == "glue":
            parts = [f"{tag}: {example[key]}" for tag, key in self.fields]
        else:
            parts = [f"passage: {example['passage']}"] if example["passage"] else []
            parts.append(f"question: {example['question']}")
            if self.multiple_choice:
                parts.append(f"choices: {_lettered_options(example['choices'])}")
        return " ".join([self.prompt_prefix, *parts])

    def _target(self, example: dict) -> str:
        if self.is_regression:
            return format_stsb_score(example["label"])
        return self.label_words[example["label"]]


def format_stsb_score(score: float) -> str:
    """An STS-B score rounded to the nearest 0.2 and printed with one decimal, e.g. 3.47 -> "3.4".

    Ties (0.1, 0.3, 0.5, ...: 13 distinct STS-B scores) round up, so 0.5 -> "0.6", rather than to the even
    multiple as Python's ``round`` would.
    """
    return f"{math.floor(score * 5 + 0.5) / 5:.1f}"


def _lettered_options(choices: list[str]) -> str:
    return " ".join(f"({letter}) {choice}" for letter, choice in zip(OPTION_LETTERS, choices))


def _parse_finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
