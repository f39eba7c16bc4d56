"""What a task is: its label space, its metrics, and how one example becomes model input.

A task is one of four kinds (:data:`KINDS`): classification, regression, multiple choice, generation. The twelve
built-in tasks and the tasks declared in a config (:mod:`.declare`) are TaskSpecs alike.

Examples are plain dicts, the same whatever the data came from:

* GLUE: ``{"idx": int, "sentence1": str, "sentence2": str | None, "label": int | float}``
  (MNLI: sentence1 = premise, sentence2 = hypothesis; QNLI: sentence1 = question, sentence2 = sentence);
* commonsense QA: ``{"question": str, "passage": str, "choices": list[str], "label": int}``, where
  ``label`` indexes ``choices`` (BoolQ: ``choices == ["no", "yes"]``, so label 1 means "yes");
* declared tasks: the file's row, plus ``label`` (a label id, a score, an option index, or the target text; see
  :mod:`pyramid_peft.data.declared`).

Three renderings serve the three kinds of model the library trains:

* :meth:`TaskSpec.to_text_to_text` for T5: the EPT/MoRE prompts and label words (docs/tasks.md);
* :meth:`TaskSpec.to_causal_lm` for decoder-only models: the same prompt with an answer cue;
* :meth:`TaskSpec.to_classification` for encoder heads: text pair plus a label id (or float for STS-B).

Where a task's rows live is part of its definition too: :class:`LocalFiles` (the offline data folder's layout) and
:class:`HubSource` (the Hugging Face hub copy) for the built-in tasks, :class:`TaskFiles` for declared ones.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

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


KINDS = ("classification", "regression", "multiple_choice", "generation")


@dataclass(frozen=True)
class TaskFiles:
    """A declared task's data: one source per split (``train`` required, ``validation`` and ``test`` optional).

    ``columns`` maps roles (``text``, ``text_pair``, ``label``, ``question``, ``choices``, ``passage``, ``target``)
    to the file's columns; ``label_values`` are the file's label values in label-id order (words, or ids).
    Each source is a file path as written in the config (``.jsonl``, ``.json``, ``.csv``, ``.parquet``; found by
    :func:`pyramid_peft.data.declared.resolve_task_file`) or a hub dataset ``{"hub": id, "config": ..., "split": ...}``.
    """

    sources: tuple[tuple[str, str | tuple[tuple[str, str], ...]], ...]
    columns: tuple[tuple[str, str], ...] = ()
    label_values: tuple = ()

    def column(self, role: str) -> str | None:
        """The file's column that holds ``role`` (``text``, ``label``, ``target``, ...), or None."""
        return dict(self.columns).get(role)

    def source(self, split: str):
        return dict(self.sources).get(split)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.sources)


@dataclass(frozen=True)
class TaskSpec:
    """One task: what kind it is, how one example becomes model input, its label space and metrics, its data.

    The built-in tasks and the tasks declared in a config (:func:`pyramid_peft.tasks.declare.declare_task`) are
    both TaskSpecs and are rendered, collated and scored by the same code.

    Args:
        name: registry key, e.g. ``"rte"``.
        family: where its rows come from: ``"glue"`` / ``"commonsense"`` (the built-in local layouts and hub
            copies) or ``"declared"`` (files or a hub dataset named in a config, see ``files``).
        prompt_prefix: the word that opens every prompt of the default layout (``"arc"`` for both ARC sets).
        label_words: text-to-text targets indexed by label id; ``()`` for regression and generation.
        paper_metric: the metric averaged over tasks (the EPT paper's per-task number); default ``metrics[0]``.
        metrics: the full metric set (HyperFormer's convention), ``paper_metric`` first.
        fields: the default layout: ``(tag, example key)`` pairs in prompt order, e.g.
            ``(("hypothesis", "sentence2"), ...)``, rendered ``"<prefix> tag: value ..."``.
        is_regression: the label is a float score in ``score_range`` (STS-B: [0, 5]).
        multiple_choice: the prompt lists lettered options and the target is a letter.
        title: how tables name the task (``"SST-2"``); default: the name.
        small: one of the small tasks whose dev set the split protocols cut in halves (CoLA, STS-B, MRPC, RTE).
        local: the task's files in a local data folder (built-in layouts).
        hub: the task's Hugging Face hub copy.
        kind: ``classification``, ``regression``, ``multiple_choice`` or ``generation`` (default: from
            ``is_regression`` / ``multiple_choice``).
        prompt: a template over the example's fields (``"Summarise: {article}"``) that replaces the default layout
            (and, for causal models, the answer cue: the template is the whole prompt).
        optional_fields: example keys left out of the default layout (and given as None to an encoder) when empty.
        text_fields: the encoder's (text, text pair) example keys; the pair may be None.
        score_range: a regression task's (low, high) score range.
        score_step, score_decimals: how a score is said by a text-to-text or causal model: rounded to the nearest
            ``score_step`` (ties up), printed with ``score_decimals`` decimals (STS-B: 0.2 and 1, as the paper).
        max_new_tokens: generation tasks: the evaluation's token budget; num_beams: their beams (None: the run's).
        chat_template: causal models: wrap the prompt with ``tokenizer.apply_chat_template`` (instruct models).
        files: a declared task's data (:class:`TaskFiles`).
        weight: multiplies the sampling strategy's probability of drawing this task (then renormalised).
        max_train_rows: train on at most this many rows (a seeded sample).
    """

    name: str
    family: str = "declared"
    prompt_prefix: str = ""
    label_words: tuple[str, ...] = ()
    paper_metric: str = ""
    metrics: tuple[str, ...] = ("accuracy",)
    fields: tuple[tuple[str, str], ...] = ()
    is_regression: bool = False
    multiple_choice: bool = False
    title: str = ""
    small: bool = False
    local: LocalFiles | None = None
    hub: HubSource | None = None
    kind: str = ""
    prompt: str | None = None
    optional_fields: tuple[str, ...] = ()
    text_fields: tuple[str, str | None] = ("sentence1", "sentence2")
    score_range: tuple[float, float] = (0.0, 5.0)
    score_step: float = 0.2
    score_decimals: int = 1
    max_new_tokens: int = 64
    num_beams: int | None = None
    chat_template: bool = False
    files: TaskFiles | None = None
    weight: float = 1.0
    max_train_rows: int | None = None

    def __post_init__(self):
        kind = self.kind or (
            "regression" if self.is_regression else "multiple_choice" if self.multiple_choice else "classification"
        )
        if kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {kind!r} is not one of: {', '.join(KINDS)}.")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "is_regression", kind == "regression")
        object.__setattr__(self, "multiple_choice", kind == "multiple_choice")
        if not self.paper_metric:
            object.__setattr__(self, "paper_metric", self.metrics[0])

    @property
    def display_name(self) -> str:
        """The task's name in tables: its ``title``, else its ``name``."""
        return self.title or self.name

    @property
    def is_generation(self) -> bool:
        return self.kind == "generation"

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split name that the declared files, the local layout or the hub copy knows, in that order."""
        declared = self.files.splits if self.files else ()
        local = self.local.splits if self.local else ()
        hub = self.hub.split_names if self.hub else ()
        return tuple(dict.fromkeys((*declared, *local, *hub)))

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

        Default layout: the text-to-text source followed by ``"\\nAnswer:"``, and the target with a leading space,
        so that prompt + answer reads "...\\nAnswer: entailment". A ``prompt`` template is the whole prompt: the
        answer follows it after a space (none when the template ends in white space).
        """
        source, target = self.to_text_to_text(example)
        if self.prompt is None:
            return source + ANSWER_CUE, " " + target
        return source, target if source[-1:].isspace() else " " + target

    def to_classification(self, example: dict) -> tuple[str, str | None, int | float]:
        """The (text_a, text_b, label) triple for an encoder with a classification or regression head.

        ``text_fields`` name the two texts (text_b is None for single texts, and for an optional field that is
        empty). Multiple choice: text_a is the question, text_b the lettered options ``"(A) ... (B) ..."``, and the
        label is the index of the correct option.
        """
        if self.multiple_choice:
            return example["question"], _lettered_options(example["choices"]), example["label"]
        text_key, pair_key = self.text_fields
        pair = example.get(pair_key) if pair_key else None
        if pair_key in self.optional_fields:
            pair = pair or None
        return example[text_key], pair, example["label"]

    def parse_prediction(self, text: str) -> int | float | str | None:
        """Map a generated string back to a label id (a float for regression), or None when it matches nothing;
        a generation task's prediction is the generated text itself, stripped.

        Only the first line counts (a causal LM may keep generating); it is stripped, lowercased and loses
        trailing ``.!,?:;``. It must then *be* a label word (a letter, optionally with an opening and / or closing
        parenthesis, for multiple choice), or a finite number for regression. Nothing is searched for inside longer
        text.
        """
        if self.is_generation:
            return text.strip()
        lines = text.strip().splitlines()
        answer = lines[0].strip().lower().rstrip(_TRAILING_PUNCTUATION).strip() if lines else ""
        if self.is_regression:
            return _parse_finite_float(answer)
        if self.multiple_choice:  # "(b)", and "(b" / "b)" cut by the token budget or written so
            answer = answer.removeprefix("(").removesuffix(")").strip()
        label_ids = {word.lower(): label_id for label_id, word in enumerate(self.label_words)}
        return label_ids.get(answer)

    def format_score(self, score: float) -> str:
        """A score as the model says it: rounded to the nearest ``score_step`` (ties up), e.g. STS-B 3.47 -> "3.4".

        Ties (STS-B: 0.1, 0.3, 0.5, ...) round up, so 0.5 -> "0.6", rather than to the even multiple as Python's
        ``round`` would.
        """
        per_unit = 1 / self.score_step
        if abs(per_unit - round(per_unit)) < 1e-9:  # 0.2 -> 5 exactly: multiply, as float division would round
            per_unit = round(per_unit)
        return f"{math.floor(score * per_unit + 0.5) / per_unit:.{self.score_decimals}f}"

    def score_targets(self) -> tuple[str, ...]:
        """Every score the model can say: the range in steps of ``score_step`` (STS-B: "0.0", "0.2", ... "5.0")."""
        low, high = self.score_range
        steps = math.floor((high - low) / self.score_step + 1e-9)
        return tuple(dict.fromkeys(self.format_score(low + i * self.score_step) for i in range(steps + 1)))

    def prompt_fields(self, example: dict) -> dict:
        """The fields a ``prompt`` template may name: the example's keys, and ``options`` (lettered choices)."""
        extra = {"options": _lettered_options(example["choices"])} if self.multiple_choice else {}
        return {**example, **extra}

    def _source(self, example: dict) -> str:
        if self.prompt is not None:
            return self.prompt.format_map(self.prompt_fields(example))
        parts = [
            f"{tag}: {example[key]}"
            for tag, key in self.fields
            if key not in self.optional_fields or example.get(key) not in (None, "")
        ]
        if self.multiple_choice:
            parts.append(f"choices: {_lettered_options(example['choices'])}")
        return " ".join([self.prompt_prefix, *parts]) if self.prompt_prefix else " ".join(parts)

    def _target(self, example: dict) -> str:
        if self.is_regression:
            return self.format_score(example["label"])
        if self.is_generation:
            return example["label"]
        return self.label_words[example["label"]]


def format_stsb_score(score: float) -> str:
    """An STS-B score rounded to the nearest 0.2 and printed with one decimal, e.g. 3.47 -> "3.4" (ties up)."""
    return TaskSpec("stsb", kind="regression").format_score(score)


def _lettered_options(choices: list[str]) -> str:
    return " ".join(f"({letter}) {choice}" for letter, choice in zip(OPTION_LETTERS, choices))


def _parse_finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
