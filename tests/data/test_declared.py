"""Declared tasks' data: the four file formats through ``datasets``, the one path rule, label words and ids,
multiple-choice answers, the carved validation split and the row cap, a data folder behind a symbolic link, and the
chat template of a causal prompt."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pyramid_peft.data import CausalLMCollator, build_splits
from pyramid_peft.data.collators import IGNORE_INDEX
from pyramid_peft.data.declared import DeclaredDataError, resolve_task_file
from pyramid_peft.tasks.declare import declare_task

ROWS = [{"body": f"text {i}", "queue": ["no", "yes"][i % 2], "id": i % 2} for i in range(12)]
TICKETS = {
    "name": "tickets",
    "kind": "classification",
    "data": {"train": "train.jsonl"},
    "columns": {"text": "body", "label": "queue"},
    "labels": ["no", "yes"],
}


def tickets(train, labels=("no", "yes"), label_column="queue", **extra):
    labels = labels if isinstance(labels, dict) else list(labels)
    columns = {"text": "body", "label": label_column}
    return declare_task({**TICKETS, "data": {"train": train, **extra}, "columns": columns, "labels": labels})


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_gives_the_same_examples(tmp_path, suffix):
    write(tmp_path / f"train{suffix}", ROWS)
    splits = build_splits(tickets(f"train{suffix}", validation=f"train{suffix}"), data_dir=tmp_path)
    assert splits.eval == [{**row, "label": row["id"]} for row in ROWS] and splits.eval_split == "validation"


def test_label_ids_map_to_words_and_an_unknown_label_names_row_field_and_file(tmp_path):
    write(tmp_path / "train.jsonl", ROWS)
    by_id = tickets("train.jsonl", labels={0: "no", 1: "yes"}, label_column="id", validation="train.jsonl")
    assert by_id.label_words == ("no", "yes")
    assert [ex["label"] for ex in build_splits(by_id, data_dir=tmp_path).eval] == [r["id"] for r in ROWS]
    with pytest.raises(DeclaredDataError, match=r"task 'tickets': .*train.jsonl, row 2: field 'labels': label 'yes'"):
        build_splits(tickets("train.jsonl", labels=["no", "maybe"]), data_dir=tmp_path)


def test_the_path_rule_absolute_then_data_folder_then_config_folder(tmp_path):
    data, config = tmp_path / "data", tmp_path / "config"
    for folder in (data, config):
        folder.mkdir()
        write(folder / "both.jsonl", ROWS)
    write(config / "only-config.jsonl", ROWS)
    assert resolve_task_file("t", "train", "both.jsonl", data, config) == data / "both.jsonl"
    assert resolve_task_file("t", "train", "only-config.jsonl", data, config) == config / "only-config.jsonl"
    assert resolve_task_file("t", "train", str(config / "both.jsonl"), data, None) == config / "both.jsonl"
    with pytest.raises(
        DeclaredDataError,
        match=r"task 't': field 'data.train': file 'nope.jsonl' not found \(tried "
        r".*data/nope.jsonl, .*config/nope.jsonl\). Rule: a data path is used as written when absolute",
    ):
        resolve_task_file("t", "train", "nope.jsonl", data, config)


def test_a_data_folder_behind_a_symbolic_link_is_recorded_as_given(tmp_path):
    from pyramid_peft.training.config import DataSection, ExperimentConfig
    from pyramid_peft.training.run_folder import recorded_config

    (tmp_path / "real").mkdir()
    write(tmp_path / "real" / "train.jsonl", ROWS)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = ExperimentConfig(tasks=[TICKETS], data=DataSection(data_dir=str(tmp_path / "link")))
    record = recorded_config(config, tmp_path / "run")
    assert record.data.data_dir == str(tmp_path / "link")
    assert record.tasks[0]["data"]["train"] == str(tmp_path / "link" / "train.jsonl")


def test_a_validation_split_is_carved_from_train_with_its_seed_and_size_stated_and_rows_capped(tmp_path):
    rows = [{"body": f"text {i}", "queue": "no"} for i in range(50)]
    write(tmp_path / "train.jsonl", rows)
    spec = declare_task(
        {
            "name": "t",
            "kind": "classification",
            "data": {"train": "train.jsonl"},
            "columns": {"text": "body", "label": "queue"},
            "labels": ["no", "yes"],
            "max_train_rows": 7,
        }
    )
    splits = build_splits(spec, data_dir=tmp_path)
    assert splits.eval_split == "train[10 rows, seed 2026] (validation carved from train)"
    assert len(splits.eval) == 10 and len(splits.train) == 7 and splits.test is None
    assert not {ex["body"] for ex in splits.eval} & {ex["body"] for ex in splits.train}
    assert build_splits(spec, data_dir=tmp_path) == splits  # the same rows every time


def test_multiple_choice_answers_by_index_letter_or_text(tmp_path):
    rows = [
        {"q": "sky?", "options": ["blue", "green"], "answer": 0},
        {"q": "grass?", "options": ["blue", "green"], "answer": "B"},
        {"q": "sea?", "options": ["blue", "green"], "answer": "blue"},
    ]
    write(tmp_path / "quiz.json", rows)
    spec = declare_task(
        {
            "name": "quiz",
            "kind": "multiple_choice",
            "data": {"train": "quiz.json", "validation": "quiz.json"},
            "columns": {"question": "q", "choices": "options", "label": "answer"},
            "num_choices": 2,
        }
    )
    examples = build_splits(spec, data_dir=tmp_path).eval
    assert [ex["label"] for ex in examples] == [0, 1, 0]
    assert spec.to_text_to_text(examples[1]) == ("quiz question: grass? choices: (A) blue (B) green", "B")
    assert spec.to_classification(examples[1]) == ("grass?", "(A) blue (B) green", 1)


def chat_tokenizer():
    words = ["<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "say", "hi", "there", "hello"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tokenizer


def test_a_chat_template_wraps_the_prompt_and_the_loss_covers_only_the_reply():
    tokenizer = chat_tokenizer()
    spec = declare_task(
        {
            "name": "chat",
            "kind": "generation",
            "data": {"train": "x.jsonl"},
            "prompt": "say {w}",
            "target": "reply",
            "chat_template": True,
        }
    )
    feature = {"task_id": 0, "task": "chat", "example": {"w": "hi", "reply": "hello there", "label": "hello there"}}
    batch = CausalLMCollator(tokenizer, tasks=[spec])([feature])
    ids = tokenizer.convert_tokens_to_ids
    prompt = ids(["<|user|>", "say", "hi", "<|assistant|>"])
    reply = [*ids(["hello", "there"]), tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist() == prompt + reply
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt) + reply
    generation = CausalLMCollator(tokenizer, for_generation=True, tasks=[spec])([feature])
    assert generation["input_ids"][0].tolist() == prompt  # the reply is never in the generation input
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="task 'chat' sets chat_template, but .* has no chat template"):
        CausalLMCollator(tokenizer, tasks=[spec])([feature])


def test_a_hub_dataset_is_loaded_only_when_written_as_one(monkeypatch, tmp_path):
    import datasets

    from pyramid_peft.data import load_examples

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return [{"body": "hello", "queue": "yes"}, {"body": "bye", "queue": "no"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = tickets({"hub": "org/tickets", "config": "en", "split": "train[:10]"})
    examples = load_examples(spec, "train", tmp_path)
    assert calls == [("org/tickets", "en", "train[:10]", {})]
    assert [ex["label"] for ex in examples] == [1, 0]
    with pytest.raises(DeclaredDataError, match="file 'org/tickets' not found"):
        resolve_task_file("tickets", "train", "org/tickets", tmp_path, None)  # a bare id is a path, never the hub


def test_a_glue_file_declared_as_a_task_reads_and_renders_as_the_built_in_task(ept_data_dir):
    """RTE's validation file through ``datasets`` gives the built-in reader's examples, and the declared default
    layout renders them as RTE does, but for the prompt's first word (the task's own name)."""
    from pyramid_peft.data import load_examples
    from pyramid_peft.tasks import get_task

    declared = declare_task(
        {
            "name": "my_rte",
            "kind": "classification",
            "data": {"train": "glue/rte/validation.jsonl"},
            "columns": {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
            "labels": {0: "entailment", 1: "not_entailment"},
        }
    )
    examples = load_examples(declared, "train", ept_data_dir)
    assert examples == load_examples("rte", "validation", ept_data_dir)
    rte = get_task("rte")
    for example in examples[:20]:
        source, target = declared.to_text_to_text(example)
        assert (source.replace("my_rte", "rte", 1), target) == rte.to_text_to_text(example)
        assert declared.to_classification(example) == rte.to_classification(example)
