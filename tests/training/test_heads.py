"""MultiTaskClassifier: mean pooling, one head per task, mixed-task batches, saving and loading."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

from pyramid_peft import EptConfig, adapter_reads_task_ids
from pyramid_peft.training.heads import HEADS_FILE, MultiTaskClassifier, forward_takes_task_ids, mean_pool

TARGETS = ["query", "key", "value", "dense"]
TASKS = ["rte", "stsb", "mnli"]
NUM_LABELS = [2, 1, 3]


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    return BertModel(config)


def classifier(method="ept", seed=0):
    config = (
        EptConfig(target_modules=TARGETS, num_tasks=3, r=2, kernel_sizes=[2, 4], top_k=1)
        if method == "ept"
        else LoraConfig(r=2, target_modules=TARGETS)
    )
    encoder = get_peft_model(tiny_bert(seed), config)
    torch.manual_seed(seed + 1)
    return MultiTaskClassifier(encoder, TASKS, NUM_LABELS, hidden_size=16, dropout=0.0)


def batch(task_ids, seed=3):
    g = torch.Generator().manual_seed(seed)
    n = len(task_ids)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[0, 4:] = 0
    labels = torch.tensor([3.7 if t == 1 else float(i % NUM_LABELS[t]) for i, t in enumerate(task_ids)])
    return {
        "input_ids": torch.randint(1, 64, (n, 6), generator=g),
        "attention_mask": mask,
        "task_ids": torch.tensor(task_ids),
        "labels": labels,
    }


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_each_example_goes_through_its_own_head_in_a_mixed_batch():
    model = classifier().eval()
    inputs = batch([0, 1, 2, 0, 1])
    out = model(**inputs)
    assert out.logits.shape == (5, 3)
    assert torch.isinf(out.logits[0, 2]) and torch.isinf(out.logits[1, 1:]).all()  # padding past each head

    hidden = model.encoder(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], task_ids=inputs["task_ids"]
    ).last_hidden_state
    pooled = mean_pool(hidden, inputs["attention_mask"])
    expected = (
        F.cross_entropy(model.heads[0](pooled[[0, 3]]), inputs["labels"][[0, 3]].long(), reduction="sum")
        + F.mse_loss(model.heads[1](pooled[[1, 4]]).squeeze(-1), inputs["labels"][[1, 4]], reduction="sum")
        + F.cross_entropy(model.heads[2](pooled[[2]]), inputs["labels"][[2]].long(), reduction="sum")
    ) / 5
    torch.testing.assert_close(out.loss, expected)
    predictions = model.predict(out.logits, inputs["task_ids"])
    assert isinstance(predictions[1], float) and predictions[2] in (0, 1, 2) and predictions[0] in (0, 1)


def test_mixed_batch_equals_the_single_task_batches():
    model = classifier().eval()
    inputs = batch([0, 2, 0, 2])
    mixed = model(**inputs).logits
    for task in (0, 2):
        rows = (inputs["task_ids"] == task).nonzero(as_tuple=True)[0]
        alone = model(**{k: v[rows] for k, v in inputs.items()}).logits
        torch.testing.assert_close(mixed[rows], alone)


def test_gradients_reach_adapters_and_only_the_used_heads():
    model = classifier().train()
    model(**batch([0, 0, 1])).loss.backward()
    assert model.heads[0].weight.grad is not None and model.heads[1].weight.grad is not None
    assert model.heads[2].weight.grad is None
    adapter_grads = [p.grad for n, p in model.encoder.named_parameters() if p.requires_grad]
    assert adapter_grads and any(g is not None and g.abs().sum() > 0 for g in adapter_grads)


def test_task_ids_reach_the_encoder_only_when_its_method_routes():
    ept = classifier("ept")
    assert adapter_reads_task_ids(ept.encoder) and ept.encoder_reads_task_ids and forward_takes_task_ids(ept)
    lora = classifier("lora")
    assert not lora.encoder_reads_task_ids and forward_takes_task_ids(lora)  # the heads take them

    class Wrapper(torch.nn.Module):  # as FSDP and DDP hold the model
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert forward_takes_task_ids(Wrapper(lora)) and not forward_takes_task_ids(Wrapper(lora.encoder))
    assert lora(**batch([0, 1])).loss.isfinite()  # stock LoRA's forward never sees task_ids


@pytest.mark.parametrize("method", ["ept", "lora"])
def test_save_and_load_round_trip(tmp_path, method):
    trained = classifier(method, seed=0).eval()
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    trained.save_pretrained(tmp_path)
    assert (tmp_path / HEADS_FILE).is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    fresh = classifier(method, seed=0).eval()
    inputs = batch([0, 1, 2])
    assert not torch.allclose(fresh(**inputs).logits[:, :1], trained(**inputs).logits[:, :1])
    fresh.load_trained(tmp_path)
    torch.testing.assert_close(fresh(**inputs).logits, trained(**inputs).logits)


def test_heads_for_other_tasks_are_refused(tmp_path):
    classifier().save_pretrained(tmp_path)
    encoder = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=TARGETS))
    other = MultiTaskClassifier(encoder, ["sst2", "stsb", "mnli"], NUM_LABELS, 16)
    with pytest.raises(ValueError, match="holds heads for tasks"):
        other.load_heads(tmp_path / HEADS_FILE)
