"""The data of tasks declared in a config: finding their files, loading them through ``datasets``, and turning rows
into example dicts, with every problem named by task, file and field before a model is loaded.

Where a file is found (one rule, also stated in the docs and in every "not found" error): an absolute path as
written; else relative to the data folder (``data.data_dir``, else ``$EPT_DATA_DIR``, else ``../shared/data``
beside the checkout); else relative to the folder of the config file. A hub dataset only when written as
``{hub: ID, config: NAME, split: NAME}``.

Example dicts keep the row's columns (prompt templates name them) and add ``label``: the label id
(classification; the file's value looked up in ``labels``), the score (regression), the correct option's index
(multiple choice, which also gets ``question``, ``passage`` and ``choices``) or the target text (generation).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..tasks.declare import template_fields
from ..tasks.spec import OPTION_LETTERS, TaskSpec
from .location import DataSourceError, resolve_data_dir

RESOLUTION_RULE = (
    "a data path is used as written when absolute; else it is looked up in the data folder (data.data_dir, else "
    "$EPT_DATA_DIR, else ../shared/data beside the checkout), then in the config file's folder; a hub dataset is "
    "written {hub: ID, config: NAME, split: NAME}"
)
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DeclaredDataError(DataSourceError):
    """A declared task's file is missing or does not hold what its declaration says."""


def resolve_task_file(
    task: str, split: str, written: str, data_dir: Path | None, config_dir: str | os.PathLike | None
) -> Path:
    """Where ``written`` (``data.<split>`` of ``task``) is, by the rule of this module; an error lists the places."""
    path = Path(written).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [root / path for root in (data_dir, Path(config_dir) if config_dir else None) if root]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.absolute()  # as given: a folder reached through a symbolic link keeps its name
    tried = ", ".join(str(c) for c in candidates) or "nowhere (no data folder and no config folder)"
    raise DeclaredDataError(
        f"task {task!r}: field 'data.{split}': file {written!r} not found (tried {tried}). Rule: {RESOLUTION_RULE}."
    )


def load_declared_rows(spec: TaskSpec, split: str, data_dir: Path | None, config_dir=None) -> tuple[list[dict], str]:
    """The raw rows of ``split`` and a description of where they came from (the file, or the hub dataset)."""
    import datasets

    source = spec.files.source(split)
    if isinstance(source, tuple):  # {hub: ID, config: NAME, split: NAME}
        hub = dict(source)
        rows = datasets.load_dataset(hub["hub"], hub.get("config"), split=hub.get("split", split))
        return list(rows), f"hub dataset {hub['hub']}"
    path = resolve_task_file(spec.name, split, source, data_dir, config_dir)
    with path.open("rb") as handle:
        if not handle.read(4096).strip() and path.stat().st_size <= 4096:  # the builders fail on an empty file
            return [], str(path)
    try:
        rows = datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as err:  # the builders' own errors (bad JSON, a CSV with ragged rows) name no task
        raise DeclaredDataError(
            f"task {spec.name!r}: field 'data.{split}': {path} cannot be read as {path.suffix} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Fix the file."
        ) from err
    return list(rows), str(path)


def declared_examples(spec: TaskSpec, split: str, data_dir: Path | None, config_dir=None) -> list[dict]:
    """Example dicts of ``split`` of a declared task; every problem names the task, the file and the field."""
    rows, where = load_declared_rows(spec, split, data_dir, config_dir)
    if not rows:
        raise DeclaredDataError(
            f"task {spec.name!r}: field 'data.{split}': {where} has no rows. Fix: give a file with rows, or leave "
            f"{split} out{' (a validation split is carved from train)' if split == 'validation' else ''}."
        )
    _check_columns(spec, split, where, set(rows[0]))
    return [_example(spec, split, where, index, row) for index, row in enumerate(rows)]


def _check_columns(spec: TaskSpec, split: str, where: str, columns: set[str]) -> None:
    for role, column in spec.files.columns:
        if column not in columns:
            field = "target" if role == "target" else f"columns.{role}"
            raise DeclaredDataError(
                f"task {spec.name!r}: field {field!r}: column {column!r} is not in {where} (its columns: "
                f"{', '.join(sorted(columns))})."
            )
    if spec.prompt is not None:
        known = columns | ({"question", "passage", "choices", "options"} if spec.multiple_choice else set())
        for name in template_fields(spec.prompt):
            if name not in known:
                raise DeclaredDataError(
                    f"task {spec.name!r}: field 'prompt' names {{{name}}}, which is not a column of {where} (its "
                    f"columns: {', '.join(sorted(columns))})."
                )


def _example(spec: TaskSpec, split: str, where: str, index: int, row: dict) -> dict:
    column = spec.files.column
    value = row[column("target" if spec.is_generation else "label")]
    location = f"task {spec.name!r}: {where}, row {index + 1}"
    if spec.is_generation:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a numeric answer is said as its digits
        if not isinstance(value, str) or not value.strip():
            raise DeclaredDataError(f"{location}: field 'target': the answer text is empty or not text ({value!r}).")
        return {**row, "label": value}
    if spec.is_regression:
        low, high = spec.score_range
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise DeclaredDataError(
                f"{location}: field 'range': score {value!r} is not a number in [{low}, {high}]. Fix the row or the "
                "range."
            )
        return {**row, "label": float(value)}
    if spec.multiple_choice:
        return {**row, **_choice_fields(spec, location, row)}
    label_id = _label_id(spec.files.label_values, value)
    if label_id is None:
        raise DeclaredDataError(
            f"{location}: field 'labels': label {value!r} is not one of {list(spec.files.label_values)}. Fix the row, "
            "or add the label to labels."
        )
    return {**row, "label": label_id}


def _label_id(values: tuple, value) -> int | None:
    """The position of the file's ``value`` among the declared label values (``True`` matches ``true``; ``1`` and
    ``"1"`` match each other)."""
    for label_id, declared in enumerate(values):
        if value == declared or _as_word(value) == _as_word(declared):
            return label_id
    return None


def _as_word(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _choice_fields(spec: TaskSpec, location: str, row: dict) -> dict:
    column = spec.files.column
    choices = row[column("choices")]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise DeclaredDataError(f"{location}: field 'columns.choices': {choices!r} is not a list of option texts.")
    if len(choices) > spec.num_labels:
        raise DeclaredDataError(
            f"{location}: field 'num_choices': {len(choices)} options, more than num_choices={spec.num_labels}."
        )
    answer = row[column("label")]
    letters = [letter.lower() for letter in OPTION_LETTERS[: len(choices)]]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        index = answer
    elif isinstance(answer, str) and answer.strip().lower() in letters:
        index = letters.index(answer.strip().lower())
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    else:
        raise DeclaredDataError(
            f"{location}: field 'columns.label': answer {answer!r} is neither an option's index "
            f"(0..{len(choices) - 1}), its letter, nor its text."
        )
    passage = row.get(column("passage")) if column("passage") else ""
    return {"question": row[column("question")], "passage": passage or "", "choices": choices, "label": index}


def declared_data_problems(specs: list[TaskSpec], data_dir=None, config_dir=None) -> list[str]:
    """The first problem of each declared task's files (missing, unreadable, a column, prompt field or label that
    is not there, no rows), found by reading them as training will; an empty list when every file is fine."""
    root = resolve_data_dir(data_dir)
    problems = []
    for spec in specs:
        if spec.family != "declared":
            continue
        try:
            for split in spec.files.splits:
                declared_examples(spec, split, root, config_dir)
        except DeclaredDataError as err:
            problems.append(f"tasks: {err}")
    return problems
