"""Where examples come from: a local data folder (for offline machines) or the Hugging Face hub.

The local folder has this layout (the project's shared data folder, see its README):

* ``glue/<task>/<file>.jsonl``: one ``{"idx", "sentence1", "sentence2", "label"}`` object per line. QNLI, MNLI
  and QQP ship a subset of train (``train_subset.jsonl``); MNLI and QQP also ship ``heldout_from_train.jsonl``
  (1000 rows of *train*, split ``"heldout"`` here) instead of their official dev sets, whose 100-row samples
  are not used.
* ``commonsense/<Dataset>/{train,test}.json``: LLM-Adapters rows ``{"instruction", "input", "output",
  "answer"}`` whose options are written inside ``instruction``.

Both sources are converted to the example dicts described in :mod:`pyramid_peft.tasks.spec`. GLUE rows with
label -1 (GLUE's "no label" marker) are dropped; any other label outside the task's labels is an error.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from ..tasks import TaskSpec, get_task
from .declared import declared_examples
from .location import DATA_DIR_ENV, DataSourceError, resolve_data_dir

STSB_SCORE_RANGE = (0.0, 5.0)
_UNLABELLED = -1

_FIX_HINT = (
    f"Fix: pass data_dir or set ${DATA_DIR_ENV} to a folder laid out as glue/<task>/<split>.jsonl and "
    "commonsense/<Dataset>/<split>.json, or make the Hugging Face hub reachable (network access, "
    "HF_HUB_OFFLINE unset)."
)


class _RowError(ValueError):
    """A malformed row; the reader that caught it adds the file and line."""


def load_examples(
    task: TaskSpec | str, split: str, data_dir: str | os.PathLike | None = None, config_dir=None
) -> list[dict]:
    """All examples of one split of ``task``, as example dicts.

    A task declared in a config (``family == "declared"``) reads its own files (:mod:`.declared`; ``config_dir`` is
    the config file's folder, where relative paths are looked up last). A built-in task's ``split`` is one of
    ``"train"``, ``"validation"``, ``"validation_mismatched"`` (MNLI), ``"test"`` (commonsense) or ``"heldout"``
    (local MNLI/QQP only). The local folder (``data_dir`` or ``$EPT_DATA_DIR``) is read when it holds that split;
    otherwise the hub copy is downloaded. When neither works, one :class:`DataSourceError` explains both failures.
    """
    spec = get_task(task) if isinstance(task, str) else task
    _check_split_name(spec, split)
    root = resolve_data_dir(data_dir)
    if spec.family == "declared":
        return declared_examples(spec, split, root, config_dir)
    path = local_split_path(spec.name, split, root) if root is not None else None
    if path is not None and path.is_file():
        return _non_empty(_read_local_file(spec, path), spec, split, str(path))
    local_problem = _describe_local_problem(spec, split, root, path)
    try:
        hub_rows, hub_location = _fetch_hub_rows(spec, split)
    except Exception as err:  # offline, network, missing package, missing split: all reported the same way
        raise DataSourceError(
            f"Cannot load {spec.name} split {split!r}.\n"
            f"  local data folder: {local_problem}\n"
            f"  Hugging Face hub: {type(err).__name__}: {err}\n{_FIX_HINT}"
        ) from err
    examples = _convert_rows(
        enumerate(hub_rows), partial(_hub_converter(spec), spec), lambda index: f"{hub_location}, row {index}"
    )
    return _non_empty(examples, spec, split, hub_location)


def _non_empty(examples: list[dict], spec: TaskSpec, split: str, source: str) -> list[dict]:
    """``examples``, unless there are none: an empty split would only fail later, far from its cause."""
    if not examples:
        raise DataSourceError(
            f"{source}: {spec.name} split {split!r} has no labelled examples (the file is empty, or every row has "
            f"label {_UNLABELLED}). Fix: restore a complete copy of the data, or remove {spec.name} from the tasks."
        )
    return examples


def local_split_path(task: str, split: str, data_dir: Path) -> Path | None:
    """Where the local layout keeps ``split`` of ``task`` under ``data_dir`` (None when it has no such split)."""
    spec = get_task(task)
    file_name = spec.local.file_name(split) if spec.local else None
    if file_name is None:
        return None
    return data_dir / spec.family / spec.local.folder / file_name


def _check_split_name(spec: TaskSpec, split: str) -> None:
    if not spec.splits:
        raise DataSourceError(
            f"task {spec.name!r} names no data: its TaskSpec has neither `local` files nor a "
            "`hub` source. Fix: give its definition a LocalFiles or a HubSource."
        )
    if split not in spec.splits:
        raise DataSourceError(f"{spec.name} has no split {split!r}; choose one of: {', '.join(sorted(spec.splits))}.")


# Local layout ---------------------------------------------------------------------------------------------


def _describe_local_problem(spec: TaskSpec, split: str, root: Path | None, path: Path | None) -> str:
    if root is None:
        return (
            f"none given (no data_dir argument, ${DATA_DIR_ENV} is unset, and there is no shared/data beside the "
            "repository)"
        )
    if not root.is_dir():
        return f"{root} does not exist"
    if path is None:
        available = ", ".join(spec.local.splits) if spec.local else "no local files"
        return f"the local layout has no {split!r} split for {spec.name} (it has: {available})"
    return f"{path} does not exist"


def _read_local_file(spec: TaskSpec, path: Path) -> list[dict]:
    if spec.family == "glue":
        return _convert_rows(_jsonl_rows(path), partial(_glue_example, spec), lambda line: f"{path}, line {line}")
    return _convert_rows(
        enumerate(_json_list(path)),
        partial(_llm_adapters_example, spec),
        lambda index: f"{path}, line {_line_of_list_item(path, index)}",
    )


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict]]:
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = _decoded(raw, path, line_number)
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"{path}, line {line_number}: invalid JSON ({err.msg}).") from err


def _decoded(raw: bytes, path: Path, line_number: int) -> str:
    """One line as UTF-8 text; a byte that is not UTF-8 is named with its file, line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataSourceError(_not_utf8(path, line_number, err.start + 1, raw[err.start])) from None


def _read_text(path: Path) -> str:
    """A whole file as UTF-8 text; a byte that is not UTF-8 is named with its file, line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise DataSourceError(_not_utf8(path, line, column, data[err.start])) from None


def _not_utf8(path: Path, line: int, column: int, byte: int) -> str:
    return (
        f"{path}, line {line}, column {column}: byte {byte:#04x} is not UTF-8 text. Fix: re-encode the file as "
        "UTF-8 (or restore a clean copy of the data)."
    )


def _json_list(path: Path) -> list:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path}, line {err.lineno}: invalid JSON ({err.msg}).") from err
    if not isinstance(rows, list):
        raise DataSourceError(f"{path}: expected a JSON list of rows, found {type(rows).__name__}.")
    return rows


_LIST_OPENING = re.compile(r"\s*\[")
_BETWEEN_LIST_ITEMS = re.compile(r"[\s,]*")


def _line_of_list_item(path: Path, index: int) -> int:
    """The line on which item ``index`` of the JSON list in ``path`` starts (only computed for error messages)."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    position = _LIST_OPENING.match(text).end()
    for _ in range(index + 1):
        start = _BETWEEN_LIST_ITEMS.match(text, position).end()
        _, position = decoder.raw_decode(text, start)
    return text.count("\n", 0, start) + 1


# Hub ------------------------------------------------------------------------------------------------------


def _hub_converter(spec: TaskSpec) -> Callable[[TaskSpec, dict], dict | None]:
    """How a hub row of ``spec`` becomes an example dict; its text columns are named by ``spec.hub.columns``."""
    columns = spec.hub.columns
    if spec.family == "glue":
        return partial(_glue_example, first=columns[0], second=columns[1] if len(columns) > 1 else None)
    if spec.multiple_choice:
        return partial(_hub_choice_example, question_key=columns[0])
    return partial(_hub_yes_no_example, question_key=columns[0], passage_key=columns[1])


def _fetch_hub_rows(spec: TaskSpec, split: str) -> tuple[Iterable[dict], str]:
    """The hub's rows for ``split`` and a description of where they came from."""
    source = spec.hub
    if source is None:
        raise LookupError(f"{spec.name} has no hub copy (its TaskSpec names local files only)")
    hub_split = source.hub_split(split)
    if hub_split is None:
        raise LookupError(
            f"the hub copy of {spec.name} has no {split!r} split (it has: {', '.join(source.split_names)})"
        )
    import datasets  # imported only when the hub is used: it is slow to import

    rows = datasets.load_dataset(source.path, source.config, split=hub_split)
    config = f" ({source.config})" if source.config else ""
    return rows, f"hub dataset {source.path}{config} split {hub_split}"


# Row conversion -------------------------------------------------------------------------------------------


def _convert_rows(
    rows: Iterable[tuple[int, dict]], convert: Callable[[dict], dict | None], locate: Callable[[int], str]
) -> list[dict]:
    """Convert (position, raw row) pairs to example dicts, naming the row's location on any error.

    ``convert`` returns None for a row to skip (an unlabelled GLUE row).
    """
    examples = []
    for position, row in rows:
        try:
            example = convert(row)
        except _RowError as err:
            raise DataSourceError(f"{locate(position)}: {err}. Fix or remove that row.") from err
        if example is not None:
            examples.append(example)
    return examples


def _field(row, key: str):
    if not isinstance(row, dict) or key not in row:
        raise _RowError(f"missing field {key!r}")
    return row[key]


def _text_field(row, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be a string, got {value!r}")
    return value


def _glue_example(spec: TaskSpec, row: dict, first: str = "sentence1", second: str | None = "sentence2"):
    """A GLUE example from a row whose two text columns are ``first`` and ``second`` (None: single sentence)."""
    label = _field(row, "label")
    if label == _UNLABELLED:
        return None
    pair = len(spec.fields) == 2
    return {
        "idx": _field(row, "idx"),
        "sentence1": _text_field(row, first),
        "sentence2": _text_field(row, second) if pair else None,
        "label": _checked_label(spec, label),
    }


def _checked_label(spec: TaskSpec, label):
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        raise _RowError(f"label {label!r} is not a number")
    if spec.is_regression:
        low, high = STSB_SCORE_RANGE
        if not low <= label <= high:
            raise _RowError(f"label {label!r} is outside the {spec.name} score range [{low}, {high}]")
        return float(label)
    if not isinstance(label, int) or not 0 <= label < spec.num_labels:
        raise _RowError(f"label {label!r} is not one of the {spec.name} label ids 0..{spec.num_labels - 1}")
    return label


def _qa_example(spec: TaskSpec, question: str, passage: str, choices: list[str], label) -> dict:
    if len(choices) > spec.num_labels:
        raise _RowError(f"{len(choices)} options, more than the {spec.num_labels} that {spec.name} allows")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise _RowError(f"label {label!r} does not index one of the {len(choices)} options")
    return {"question": question, "passage": passage, "choices": list(choices), "label": label}


_BOOLQ_INSTRUCTION = re.compile(
    r"^Please answer the following question with true or false, question: (?P<question>.*)"
    r"\n\nAnswer format: true/false$",
    re.S,
)
_CHOICE_INSTRUCTION = re.compile(
    r"^Please choose the correct answer to the question: (?P<question>.*)"
    r"\n\n(?P<options>Answer1: .*)\n\nAnswer format: \S+$",
    re.S,
)
_OPTION = re.compile(r"Answer(?P<number>\d+): (?P<text>.*?)(?= Answer\d+: |$)", re.S)
_BOOLQ_ANSWERS = {"false": 0, "true": 1}


def _llm_adapters_example(spec: TaskSpec, row: dict) -> dict:
    """An example from an LLM-Adapters row, whose question and options are written inside ``instruction``."""
    instruction = _text_field(row, "instruction")
    answer = _text_field(row, "answer")
    passage = row.get("input") or ""
    if not spec.multiple_choice:
        match = _match(_BOOLQ_INSTRUCTION, instruction, "BoolQ")
        if answer not in _BOOLQ_ANSWERS:
            raise _RowError(f"answer {answer!r} is not 'true' or 'false'")
        return _qa_example(spec, match["question"], passage, list(spec.label_words), _BOOLQ_ANSWERS[answer])
    match = _match(_CHOICE_INSTRUCTION, instruction, "multiple-choice")
    options = list(_OPTION.finditer(match["options"]))
    if [option["number"] for option in options] != [str(n) for n in range(1, len(options) + 1)]:
        raise _RowError("the options in 'instruction' are not numbered Answer1, Answer2, ...")
    if not re.fullmatch(r"answer\d+", answer):
        raise _RowError(f"answer {answer!r} is not of the form 'answerN'")
    choices = [option["text"] for option in options]
    return _qa_example(spec, match["question"], passage, choices, int(answer[len("answer") :]) - 1)


def _match(pattern: re.Pattern, instruction: str, kind: str) -> re.Match:
    match = pattern.match(instruction)
    if match is None:
        raise _RowError(f"'instruction' is not in the LLM-Adapters {kind} format: {instruction[:80]!r}...")
    return match


def _hub_yes_no_example(spec: TaskSpec, row: dict, question_key: str, passage_key: str) -> dict:
    answer = _field(row, "answer")
    if not isinstance(answer, bool):
        raise _RowError(f"answer {answer!r} is not a boolean")
    return _qa_example(
        spec, _text_field(row, question_key), _text_field(row, passage_key), list(spec.label_words), int(answer)
    )


def _hub_choice_example(spec: TaskSpec, row: dict, question_key: str) -> dict:
    choices = _field(row, "choices")
    texts, keys = _field(choices, "text"), _field(choices, "label")
    answer_key = _field(row, "answerKey")
    if answer_key not in keys:
        raise _RowError(f"answerKey {answer_key!r} is not one of the option labels {keys}")
    # ARC labels a few items "1".."4" instead of "A".."D"; the position is what counts.
    return _qa_example(spec, _text_field(row, question_key), "", texts, keys.index(answer_key))
