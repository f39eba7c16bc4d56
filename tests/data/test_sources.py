"""Loading examples: the local folder, the hub (through a fake ``datasets.load_dataset``) and every error path."""

import json
from pathlib import Path

import pytest

from pyramid_peft.data import DataSourceError, load_examples, location, resolve_data_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_env_data_dir(monkeypatch):
    """No local data at all: $EPT_DATA_DIR unset and no shared/data beside the repository (the hub is used)."""
    monkeypatch.delenv("EPT_DATA_DIR", raising=False)
    monkeypatch.setattr(location, "shared_data_dir", lambda: None)


def fake_hub(monkeypatch, tables):
    """Replace ``datasets.load_dataset`` with a lookup in ``tables[(path, config, split)]``; record the calls."""
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return tables[(path, name, split)]

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    return calls


def offline_hub(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("hub unreachable in this test")

    monkeypatch.setattr("datasets.load_dataset", load_dataset)


def write_glue(root, task, file_name, lines):
    folder = root / "glue" / task
    folder.mkdir(parents=True)
    (folder / file_name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / file_name


RTE_ROW = {"idx": 0, "sentence1": "A cat sat.", "sentence2": "A cat is sitting.", "label": 0}


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EPT_DATA_DIR", str(tmp_path / "from_env"))
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    assert resolve_data_dir() == tmp_path / "from_env"
    monkeypatch.delenv("EPT_DATA_DIR")
    monkeypatch.setattr(location, "shared_data_dir", lambda: None)
    assert resolve_data_dir() is None


def test_without_ept_data_dir_the_shared_folder_beside_the_checkout_is_found(monkeypatch, tmp_path):
    monkeypatch.delenv("EPT_DATA_DIR", raising=False)
    beside_repo = REPO.parent / "shared" / "data"
    if beside_repo.is_dir():  # this editable checkout: found from the package's own location, whatever the cwd
        monkeypatch.chdir(tmp_path)
        assert resolve_data_dir() == beside_repo.resolve()
    # an installed (not editable) package: found from the current folder, the checkout
    monkeypatch.setattr(location, "__file__", str(tmp_path / "site" / "a" / "b" / "location.py"))
    checkout, data = tmp_path / "checkout", tmp_path / "shared" / "data"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    assert resolve_data_dir() is None
    data.mkdir(parents=True)
    assert resolve_data_dir() == data.resolve()


def test_a_byte_that_is_not_utf8_names_file_line_and_column(tmp_path):
    path = write_glue(tmp_path, "rte", "train.jsonl", [json.dumps(RTE_ROW), json.dumps(RTE_ROW)])
    text = path.read_bytes()
    path.write_bytes(text[: len(text) // 2 + 20] + b"\xff" + text[len(text) // 2 + 20 :])
    with pytest.raises(DataSourceError, match=rf"{path}, line 2, column \d+: byte 0xff is not UTF-8.*re-encode"):
        load_examples("rte", "train", tmp_path)
    boolq = tmp_path / "commonsense" / "boolq" / "train.json"
    boolq.parent.mkdir(parents=True)
    boolq.write_bytes(b'[\n {"instruction": "caf\xe9"}\n]')
    with pytest.raises(DataSourceError, match=rf"{boolq}, line 2, column 22: byte 0xe9 is not UTF-8"):
        load_examples("boolq", "train", tmp_path)


@pytest.mark.parametrize(
    "task, split, rows",
    [
        ("rte", "validation", 277),
        ("qnli", "train", 9999),
        ("mnli", "heldout", 1000),
        ("qqp", "train", 8999),
        ("boolq", "test", 3270),
        ("openbookqa", "test", 500),
        ("arc_challenge", "train", 1119),
    ],
)
def test_local_row_counts(task, split, rows, ept_data_dir):
    assert len(load_examples(task, split, ept_data_dir)) == rows


def test_local_examples_have_the_documented_shape(ept_data_dir):
    cola = load_examples("cola", "validation", ept_data_dir)[0]
    assert cola == {
        "idx": 0,
        "sentence1": "The sailors rode the breeze clear of the rocks.",
        "sentence2": None,
        "label": 1,
    }
    stsb = load_examples("stsb", "validation", ept_data_dir)[1]
    assert stsb["label"] == 4.75 and isinstance(stsb["label"], float)
    arc = load_examples("arc_easy", "train", ept_data_dir)
    assert {len(example["choices"]) for example in arc} == {3, 4, 5}
    assert arc[0] == {
        "question": "Which factor will most likely cause a person to develop a fever?",
        "passage": "",
        "choices": [
            "a leg muscle relaxing after exercise",
            "a bacterial population in the bloodstream",
            "several viral particles on the skin",
            "carbohydrates being digested in the stomach",
        ],
        "label": 1,
    }


def test_missing_folder_and_unreachable_hub_give_one_error_naming_both(monkeypatch, tmp_path):
    offline_hub(monkeypatch)
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataSourceError) as error:
        load_examples("rte", "train", missing)
    message = str(error.value)
    assert f"{missing} does not exist" in message
    assert "ConnectionError: hub unreachable in this test" in message
    assert "EPT_DATA_DIR" in message and "Fix:" in message


def test_unset_data_dir_and_unreachable_hub(monkeypatch, no_env_data_dir):
    offline_hub(monkeypatch)
    with pytest.raises(DataSourceError, match=r"\$EPT_DATA_DIR is unset(.|\n)*ConnectionError"):
        load_examples("boolq", "train")


def test_split_absent_locally_falls_back_to_the_hub(monkeypatch, ept_data_dir):
    offline_hub(monkeypatch)
    with pytest.raises(DataSourceError, match=r"no 'validation' split for mnli \(it has: train, heldout\)"):
        load_examples("mnli", "validation", ept_data_dir)


def test_unknown_split_is_refused_before_any_loading(tmp_path):
    with pytest.raises(DataSourceError, match="rte has no split 'dev'; choose one of: train, validation"):
        load_examples("rte", "dev", tmp_path)


def test_invalid_json_names_file_and_line(tmp_path):
    path = write_glue(tmp_path, "rte", "validation.jsonl", [json.dumps(RTE_ROW), '{"idx": 1, "sentence1": '])
    with pytest.raises(DataSourceError, match=f"{path}, line 2: invalid JSON"):
        load_examples("rte", "validation", tmp_path)


def test_missing_field_names_file_and_line(tmp_path):
    incomplete = {key: value for key, value in RTE_ROW.items() if key != "sentence2"}
    path = write_glue(tmp_path, "rte", "validation.jsonl", [json.dumps(RTE_ROW)] * 2 + [json.dumps(incomplete)])
    with pytest.raises(DataSourceError, match=f"{path}, line 3: missing field 'sentence2'"):
        load_examples("rte", "validation", tmp_path)


@pytest.mark.parametrize("task, bad_label", [("rte", 2), ("mnli", 3), ("cola", "1"), ("stsb", 5.5)])
def test_label_outside_the_task_names_file_and_line(task, bad_label, tmp_path):
    file_name = "heldout_from_train.jsonl" if task == "mnli" else "validation.jsonl"
    path = write_glue(tmp_path, task, file_name, [json.dumps({**RTE_ROW, "label": bad_label})])
    with pytest.raises(DataSourceError, match=f"{path}, line 1: label {bad_label!r}"):
        load_examples(task, "heldout" if task == "mnli" else "validation", tmp_path)


def test_unlabelled_glue_rows_are_dropped(tmp_path):
    write_glue(tmp_path, "rte", "validation.jsonl", [json.dumps(RTE_ROW), json.dumps({**RTE_ROW, "label": -1})])
    assert load_examples("rte", "validation", tmp_path) == [RTE_ROW]


def test_malformed_commonsense_row_names_file_and_line(tmp_path):
    instruction = (
        "Please choose the correct answer to the question: Q{n}?\n\nAnswer1: x Answer2: y Answer3: z "
        "Answer4: w\n\nAnswer format: answer1/answer2/answer3/answer4"
    )
    rows = [{"instruction": instruction.format(n=n), "input": "", "output": "", "answer": "answer1"} for n in range(3)]
    rows[2]["answer"] = "answer7"
    folder = tmp_path / "commonsense" / "openbookqa"
    folder.mkdir(parents=True)
    text = json.dumps(rows, indent=4)
    (folder / "test.json").write_text(text, encoding="utf-8")
    # The bad row's opening brace is the line just before its "instruction" line.
    expected_line = next(i for i, line in enumerate(text.splitlines(), start=1) if "Q2?" in line) - 1
    with pytest.raises(
        DataSourceError, match=f"test.json, line {expected_line}: label 6 does not index one of the 4 options"
    ):
        load_examples("openbookqa", "test", tmp_path)


def test_hub_glue_rows_are_converted(monkeypatch, no_env_data_dir):
    hub_rows = [
        {"premise": "P0", "hypothesis": "H0", "label": 2, "idx": 0},
        {"premise": "P1", "hypothesis": "H1", "label": -1, "idx": 1},
    ]
    calls = fake_hub(monkeypatch, {("nyu-mll/glue", "mnli", "validation_matched"): hub_rows})
    assert load_examples("mnli", "validation") == [{"idx": 0, "sentence1": "P0", "sentence2": "H0", "label": 2}]
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]


def test_hub_single_sentence_glue(monkeypatch, no_env_data_dir):
    fake_hub(monkeypatch, {("nyu-mll/glue", "sst2", "train"): [{"sentence": "fine .", "label": 1, "idx": 4}]})
    assert load_examples("sst2", "train") == [{"idx": 4, "sentence1": "fine .", "sentence2": None, "label": 1}]


def test_hub_commonsense_rows_are_converted(monkeypatch, no_env_data_dir):
    arc_row = {
        "id": "x",
        "question": "Which?",
        "answerKey": "3",
        "choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]},
    }
    obqa_row = {
        "id": "y",
        "question_stem": "What?",
        "answerKey": "B",
        "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
    }
    boolq_row = {"question": "is it", "answer": True, "passage": "It is."}
    calls = fake_hub(
        monkeypatch,
        {
            ("allenai/ai2_arc", "ARC-Challenge", "test"): [arc_row],
            ("allenai/openbookqa", "main", "train"): [obqa_row],
            ("google/boolq", None, "validation"): [boolq_row],
        },
    )
    assert load_examples("arc_challenge", "test") == [
        {"question": "Which?", "passage": "", "choices": ["a", "b", "c", "d"], "label": 2}
    ]
    assert load_examples("openbookqa", "train")[0]["label"] == 1
    assert load_examples("boolq", "test") == [
        {"question": "is it", "passage": "It is.", "choices": ["no", "yes"], "label": 1}
    ]
    assert calls[-1] == ("google/boolq", None, "validation")  # LLM-Adapters' BoolQ test is the official dev set


def test_malformed_hub_row_names_dataset_and_row(monkeypatch, no_env_data_dir):
    bad = {"id": "x", "question": "Which?", "answerKey": "E", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}
    fake_hub(monkeypatch, {("allenai/ai2_arc", "ARC-Easy", "train"): [bad]})
    with pytest.raises(DataSourceError, match=r"allenai/ai2_arc \(ARC-Easy\) split train, row 0: answerKey 'E'"):
        load_examples("arc_easy", "train")


def test_heldout_exists_only_locally(monkeypatch, no_env_data_dir):
    fake_hub(monkeypatch, {})
    with pytest.raises(DataSourceError, match="the hub copy of qqp has no 'heldout' split"):
        load_examples("qqp", "heldout")
