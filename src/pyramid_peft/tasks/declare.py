"""Tasks declared in a config: a mapping (the YAML of a config's ``tasks`` list) becomes a :class:`TaskSpec`.

The schema follows what users of LLaMA-Factory (``dataset_info.json``: file, column map), torchtune
(``instruct_dataset(source, data_files, column_map)``) and axolotl (``datasets: [{path, type, field_*}]``) write::

    name: tickets                      # lower case letters, digits, _ ; not a built-in task's name
    kind: classification               # classification | regression | multiple_choice | generation
    data: {train: tickets/train.jsonl, validation: tickets/dev.jsonl, test: ...}   # or {hub: id, config, split}
    columns: {text: body, text_pair: ..., label: queue}     # role -> the file's column
    labels: [billing, outage, other]   # label words as the file stores them, or {0: no, 1: yes} where it stores ids
    prompt: "Ticket: {body}"           # optional template over the row's columns (generation: required)
    target: answer                     # generation: the column holding the answer text
    metrics: [accuracy, f1]            # the first one is averaged over tasks
    range: [0, 5]                      # regression: required
    rendering: {step: 0.2, decimals: 1}   # regression: how a text-to-text or causal model says a score
    num_choices: 4                     # multiple choice: most options of an item (letters A, B, ...)
    max_new_tokens: 64                 # generation: evaluation budget; num_beams: beams (default: the run's)
    chat_template: false               # generation on causal models: tokenizer.apply_chat_template
    weight: 1.0                        # sampling weight; max_train_rows: cap on training rows
    title: Tickets                     # its name in tables

A built-in task takes a mapping too, to set its mixing: ``{name: sst2, weight: 2, max_train_rows: 5000}``.

Only the declaration is checked here (no file is opened): :func:`declaration_problems` lists every problem, each
naming the task and the field. The files are checked by :mod:`pyramid_peft.data.declared`.
"""

from __future__ import annotations

import re
import string
from dataclasses import replace

from .spec import KINDS, OPTION_LETTERS, TaskFiles, TaskSpec

SPLIT_NAMES = ("train", "validation", "test")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# The metrics each kind may list; the first is the default.
KIND_METRICS = {
    "classification": ("accuracy", "f1", "f1_macro", "mcc"),
    "regression": ("pearson", "spearman"),
    "multiple_choice": ("accuracy",),
    "generation": ("exact_match", "rouge_l", "chrf"),
}
# The roles each kind maps to the file's columns: (required, optional).
KIND_COLUMNS = {
    "classification": (("text", "label"), ("text_pair",)),
    "regression": (("text", "label"), ("text_pair",)),
    "multiple_choice": (("question", "choices", "label"), ("passage",)),
    "generation": ((), ()),
}
KEYS = (
    "name",
    "kind",
    "title",
    "data",
    "columns",
    "labels",
    "prompt",
    "target",
    "metrics",
    "range",
    "rendering",
    "num_choices",
    "max_new_tokens",
    "num_beams",
    "chat_template",
    "weight",
    "max_train_rows",
)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MIXING_KEYS = ("weight", "max_train_rows")  # what a mapping may set for a built-in task


class TaskDeclarationError(ValueError):
    """A task declaration names an unknown kind, metric, key or column role, or lacks a required field."""


def declare_task(raw: dict) -> TaskSpec:
    """The :class:`TaskSpec` of a declaration; :class:`TaskDeclarationError` lists every problem of it."""
    problems = declaration_problems(raw)
    if problems:
        raise TaskDeclarationError("\n".join(problems))
    if _is_built_in_mixing(raw):
        from .registry import get_task

        mixing = {key: raw[key] for key in MIXING_KEYS if key in raw}
        return replace(get_task(raw["name"]), **{**mixing, "weight": float(mixing.get("weight", 1.0))})
    kind, name = raw["kind"], raw["name"]
    columns = dict(raw.get("columns") or {})
    metrics = tuple(raw.get("metrics") or KIND_METRICS[kind][:1])
    label_values, label_words = _labels(raw.get("labels"))
    common = {
        "name": name,
        "family": "declared",
        "kind": kind,
        "title": raw.get("title", ""),
        "prompt_prefix": name,
        "metrics": metrics,
        "prompt": raw.get("prompt"),
        "weight": float(raw.get("weight", 1.0)),
        "max_train_rows": raw.get("max_train_rows"),
    }
    if kind == "generation":
        columns["target"] = raw["target"]
        return TaskSpec(
            **common,
            files=_files(raw["data"], columns, ()),
            max_new_tokens=raw.get("max_new_tokens", 64),
            num_beams=raw.get("num_beams"),
            chat_template=bool(raw.get("chat_template", False)),
        )
    if kind == "multiple_choice":
        count = raw.get("num_choices", 4)
        return TaskSpec(
            **common,
            files=_files(raw["data"], columns, ()),
            label_words=OPTION_LETTERS[:count],
            fields=(("passage", "passage"), ("question", "question")),
            optional_fields=("passage",),
            text_fields=("question", "passage"),
        )
    text, pair = columns["text"], columns.get("text_pair")
    layout = {
        "fields": tuple((column, column) for column in (text, pair) if column),
        "optional_fields": (pair,) if pair else (),
        "text_fields": (text, pair),
    }
    if kind == "regression":
        rendering = raw.get("rendering") or {}
        return TaskSpec(
            **common,
            **layout,
            files=_files(raw["data"], columns, ()),
            score_range=tuple(float(v) for v in raw["range"]),
            score_step=float(rendering.get("step", 0.2)),
            score_decimals=int(rendering.get("decimals", 1)),
        )
    return TaskSpec(**common, **layout, files=_files(raw["data"], columns, label_values), label_words=label_words)


def declared_name(raw) -> str:
    """How messages name a declaration: its name, or its position where it has none."""
    return repr(raw.get("name")) if isinstance(raw, dict) and raw.get("name") else "(unnamed)"


def declaration_problems(raw, built_in_names=()) -> list[str]:
    """Every problem of one declaration (``built_in_names``: names it must not take), each naming task and field."""
    if not isinstance(raw, dict):
        return [f"tasks: {raw!r} is neither a task name nor a task declaration (a mapping with name, kind, data)."]
    where = f"tasks: task {declared_name(raw)}"
    if _is_built_in_mixing(raw):
        return _number_problems(where, raw)
    problems = [_unknown_key(where, key) for key in raw if key not in KEYS]
    name, kind = raw.get("name"), raw.get("kind")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"{where}: field 'name' must be lower-case letters, digits and _, e.g. name: tickets.")
    elif name in built_in_names:
        problems.append(
            f"{where}: field 'name' is the name of a built-in task, which takes only {', '.join(MIXING_KEYS)} here; "
            "give the declared task another name."
        )
    if kind not in KINDS:
        return [*problems, f"{where}: field 'kind' is {kind!r}, not one of: {', '.join(KINDS)}."]
    problems += _data_problems(where, raw.get("data"))
    problems += _column_problems(where, kind, raw)
    problems += _metric_problems(where, kind, raw)
    problems += _kind_problems(where, kind, raw)
    problems += _number_problems(where, raw)
    return problems


def _is_built_in_mixing(raw: dict) -> bool:
    """A mapping that names a built-in task and sets only its mixing (``weight``, ``max_train_rows``)."""
    from .registry import TASK_NAMES

    return raw.get("name") in TASK_NAMES and set(raw) <= {"name", *MIXING_KEYS}


def _unknown_key(where: str, key) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), KEYS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{where}: unknown field {key!r} (a task declaration has: {', '.join(KEYS)}).{hint}"


def _data_problems(where: str, data) -> list[str]:
    if not isinstance(data, dict) or "train" not in data:
        return [f"{where}: field 'data' must map splits to files, with train at least: data: {{train: FILE}}."]
    problems = [
        f"{where}: field 'data.{split}' is not a split; use {', '.join(SPLIT_NAMES)}."
        for split in data
        if split not in SPLIT_NAMES
    ]
    for split, source in data.items():
        if isinstance(source, dict):
            if not isinstance(source.get("hub"), str) or set(source) - {"hub", "config", "split"}:
                problems.append(
                    f"{where}: field 'data.{split}': a hub dataset is written {{hub: ID, config: NAME, split: NAME}}."
                )
        elif not isinstance(source, str) or not source.lower().endswith(FILE_SUFFIXES):
            problems.append(
                f"{where}: field 'data.{split}' is {source!r}: give a {', '.join(FILE_SUFFIXES)} file or "
                "{hub: ID, config: NAME, split: NAME}."
            )
    return problems


def _column_problems(where: str, kind: str, raw: dict) -> list[str]:
    required, optional = KIND_COLUMNS[kind]
    columns = raw.get("columns") or {}
    if not isinstance(columns, dict):
        return [f"{where}: field 'columns' must map roles to the file's columns, e.g. {{text: body, label: queue}}."]
    problems = [
        f"{where}: field 'columns.{role}' is not a role of a {kind} task (roles: "
        f"{', '.join((*required, *optional)) or 'none: name fields in prompt and target'})."
        for role in columns
        if role not in (*required, *optional)
    ]
    problems += [
        f"{where}: field 'columns.{role}' is missing: name the file's column that holds it."
        for role in required
        if not isinstance(columns.get(role), str)
    ]
    return problems


def _metric_problems(where: str, kind: str, raw: dict) -> list[str]:
    metrics = raw.get("metrics")
    if metrics is None:
        return []
    if not isinstance(metrics, list) or not metrics:
        return [f"{where}: field 'metrics' must be a non-empty list, e.g. metrics: [{KIND_METRICS[kind][0]}]."]
    problems = [
        f"{where}: field 'metrics' names {metric!r}, not a {kind} metric ({', '.join(KIND_METRICS[kind])})."
        for metric in metrics
        if metric not in KIND_METRICS[kind]
    ]
    labels = raw.get("labels")
    if "f1" in metrics and isinstance(labels, (list, dict)) and len(labels) != 2:
        problems.append(f"{where}: field 'metrics': f1 is the positive class's F1 of two labels; use f1_macro.")
    return problems


def _kind_problems(where: str, kind: str, raw: dict) -> list[str]:
    problems = []
    labels = raw.get("labels")
    if kind == "classification":
        if not (isinstance(labels, (list, dict)) and len(labels) >= 2):
            problems.append(
                f"{where}: field 'labels' must list at least two label words ([billing, outage]) or map the file's "
                "label ids to words ({0: no, 1: yes})."
            )
        elif len(set(_labels(labels)[1])) != len(labels):
            problems.append(f"{where}: field 'labels' repeats a label word.")
    elif labels is not None:
        problems.append(f"{where}: field 'labels' belongs to classification tasks only.")
    if kind == "regression":
        bounds = raw.get("range")
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(v) for v in bounds)):
            problems.append(f"{where}: field 'range' must be [low, high], the scores' range, e.g. range: [0, 5].")
        elif bounds[0] >= bounds[1]:
            problems.append(f"{where}: field 'range' {bounds} must have low < high.")
        rendering = raw.get("rendering") or {}
        if not isinstance(rendering, dict) or set(rendering) - {"step", "decimals"}:
            problems.append(f"{where}: field 'rendering' is written {{step: 0.2, decimals: 1}}.")
    elif raw.get("range") is not None or raw.get("rendering") is not None:
        problems.append(f"{where}: fields 'range' and 'rendering' belong to regression tasks only.")
    if kind == "generation":
        if not isinstance(raw.get("prompt"), str):
            problems.append(f"{where}: field 'prompt' is required for generation, e.g. prompt: 'Summarise: {{text}}'.")
        if not isinstance(raw.get("target"), str):
            problems.append(f"{where}: field 'target' must name the column that holds the answer text.")
    else:
        for key in ("target", "max_new_tokens", "num_beams", "chat_template"):
            if raw.get(key) is not None:
                problems.append(f"{where}: field {key!r} belongs to generation tasks only.")
    prompt = raw.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        problems.append(f"{where}: field 'prompt' must be a string.")
    elif isinstance(prompt, str):
        try:
            template_fields(prompt)
        except ValueError as err:
            problems.append(f"{where}: field 'prompt' is not a valid template ({err}); write fields as {{column}}.")
    return problems


def _number_problems(where: str, raw: dict) -> list[str]:
    problems = []
    for key, low in (("num_choices", 2), ("max_new_tokens", 1), ("num_beams", 1), ("max_train_rows", 1)):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            problems.append(f"{where}: field {key!r} must be a whole number of at least {low}, got {value!r}.")
    if isinstance(raw.get("num_choices"), int) and raw["num_choices"] > len(OPTION_LETTERS):
        problems.append(f"{where}: field 'num_choices' must be at most {len(OPTION_LETTERS)}.")
    weight = raw.get("weight")
    if weight is not None and not (_is_number(weight) and weight > 0):
        problems.append(f"{where}: field 'weight' must be a positive number, got {weight!r}.")
    return problems


def template_fields(template: str) -> list[str]:
    """The field names a ``str.format`` template uses (``"Q: {question}"`` -> ``["question"]``)."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if any(not name or not name.isidentifier() for name in names):
        raise ValueError("a field is empty or not a plain column name")
    return names


def _labels(labels) -> tuple[tuple, tuple[str, ...]]:
    """(the file's label values in label-id order, the label words): a list is both; a map is ids -> words."""
    if isinstance(labels, dict):
        ids = sorted(labels, key=lambda key: (str(type(key)), key))
        return tuple(ids), tuple(_word(labels[key]) for key in ids)
    words = tuple(_word(label) for label in labels or ())
    return words, words


def _word(value) -> str:
    """A label word as written: YAML reads ``true`` / ``false`` as booleans, which files store as words."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _files(data: dict, columns: dict, label_values: tuple) -> TaskFiles:
    sources = tuple(
        (split, tuple(sorted(source.items())) if isinstance(source, dict) else source) for split, source in data.items()
    )
    return TaskFiles(sources, tuple(columns.items()), label_values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def entry_name(entry) -> str:
    """The task name of a config's ``tasks`` entry: a built-in name, or a declaration's ``name``."""
    return str(entry.get("name")) if isinstance(entry, dict) else str(entry)


def task_specs(entries) -> list[TaskSpec]:
    """The :class:`TaskSpec` of each entry of a config's ``tasks``: built-in names looked up, declarations declared."""
    from .registry import get_task

    return [declare_task(entry) if isinstance(entry, dict) else get_task(entry) for entry in entries]


def tasks_problems(entries) -> list[str]:
    """Every problem of a config's ``tasks`` list: unknown names, bad declarations, a name used twice."""
    from .registry import TASK_NAMES, UnknownTaskError, get_task

    problems = []
    for entry in entries:
        if isinstance(entry, dict):
            problems += declaration_problems(entry, TASK_NAMES)
            continue
        try:
            get_task(str(entry))
        except UnknownTaskError as err:
            problems.append(f"tasks: {err}")
    names = [entry_name(entry).lower() for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(
            f"tasks: {', '.join(repeated)} listed more than once in {names}: each task gets one task id "
            "and one head, so give each task its own name and list it once."
        )
    return problems
