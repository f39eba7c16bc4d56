"""MOELoRA: float64 parity, mixed-task batches, r % E, gradients, per-task merge/export, beams, counts."""

import pytest
import torch
from _models import (
    T5_BASE_TARGETS,
    adapted_shapes,
    adapter_grads,
    assert_equals_base,
    generate_with_beams,
    main_output,
    peft_tiny,
    perturb,
    t5_base_skeleton,
    training_loss,
)
from peft import get_peft_model
from torch import nn

from conftest import tiny_batch
from pyramid_peft import TaskRoutingError, count_parameters, make_peft_config
from pyramid_peft.methods.moelora import MoeLoraConfig
from pyramid_peft.methods.moelora.layer import Linear
from pyramid_peft.routing import TaskRoute

IDS = torch.tensor([2, 0, 1, 0])


def tiny(family, **overrides):
    settings = dict(num_tasks=3, r=4, num_experts=2, task_embedding_dim=8, lora_dropout=0.0)
    settings.update(overrides)
    return peft_tiny(family, MoeLoraConfig(**settings))


def make_layer(d_in=10, d_out=7, r=6, num_experts=3, num_tasks=3):
    torch.manual_seed(0)
    config = MoeLoraConfig(
        target_modules=["x"],
        num_tasks=num_tasks,
        r=r,
        num_experts=num_experts,
        lora_alpha=12,
        task_embedding_dim=5,
        lora_dropout=0.0,
    )
    layer = Linear(nn.Linear(d_in, d_out), "default", config, route=TaskRoute(num_tasks, "MOELoRA")).double()
    with torch.no_grad():
        layer.moelora_B["default"].normal_()
    return layer


def test_forward_equals_float64_reference():
    layer = make_layer()
    x = torch.randn(4, 5, 10, dtype=torch.float64)
    ids = torch.tensor([2, 0, 1, 2])
    with layer.route.call(ids):
        out = layer(x)
    A, B = layer.moelora_A["default"], layer.moelora_B["default"]
    G, E = layer.moelora_gate["default"].weight, layer.moelora_task_embedding["default"]
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    for n, t in enumerate(ids.tolist()):
        w = torch.softmax(G @ E[t], dim=0)
        delta = sum(w[i] * B[:, 2 * i : 2 * i + 2] @ A[2 * i : 2 * i + 2] for i in range(3))  # rank-2 experts
        expected = x[n] @ W0.T + b0 + (12 / 6) * x[n] @ delta.T
        torch.testing.assert_close(out[n], expected, rtol=0, atol=1e-12)


def test_mixed_task_batch_equals_per_task_batches():
    layer = make_layer()
    x = torch.randn(5, 4, 10, dtype=torch.float64)
    ids = torch.tensor([2, 0, 1, 0, 2])
    with layer.route.call(ids):
        mixed = layer(x)
    for task in range(3):
        rows = ids == task
        with layer.route.call(ids[rows]):
            torch.testing.assert_close(mixed[rows], layer(x[rows]), rtol=0, atol=1e-12)


def test_mixed_task_batch_equals_per_task_batches_in_a_model(family):
    model = tiny(family)
    perturb(model)
    batch = tiny_batch(family)
    mixed = main_output(model, batch, task_ids=IDS)
    for task in range(3):
        rows = task == IDS
        alone = main_output(model, {k: v[rows] for k, v in batch.items()}, task_ids=IDS[rows])
        torch.testing.assert_close(mixed[rows], alone, rtol=0, atol=1e-5)


def test_rank_must_split_evenly_among_experts():
    with pytest.raises(ValueError, match=r"r=10 must be divisible by num_experts=4.*r=8"):
        MoeLoraConfig(target_modules=["q"], r=10, num_experts=4)


def test_initialisation():
    config = MoeLoraConfig(target_modules=["x"], num_tasks=5)
    layer = Linear(nn.Linear(512, 256), "default", config, route=TaskRoute(5, "MOELoRA"))
    A, B = layer.moelora_A["default"], layer.moelora_B["default"]
    assert A.shape == (16, 512) and B.shape == (256, 16) and config.expert_rank == 2
    assert abs(A.std().item() - 0.01) < 0.001 and B.abs().sum() == 0
    gate = layer.moelora_gate["default"]
    assert gate.weight.shape == (8, 64) and gate.bias is None
    assert layer.moelora_task_embedding["default"].shape == (5, 64)


def test_output_equals_base_at_init_and_task_ids_are_required(family):
    model = tiny(family)
    batch = tiny_batch(family)
    assert_equals_base(model, batch, task_ids=IDS)
    with pytest.raises(TaskRoutingError, match="task_ids"):
        main_output(model, batch)


def test_up_factors_learn_first_then_every_part(family):
    model = tiny(family)
    batch = tiny_batch(family)
    ids = torch.tensor([2, 0, 2, 0])  # task 1 unused: its embedding row gets no gradient
    training_loss(model, batch, task_ids=ids).backward()
    assert all(g.abs().sum() > 0 for g in adapter_grads(model, "moelora_B"))
    zero_at_init = ("moelora_A", "moelora_gate", "moelora_task_embedding")  # B = 0 blocks them at step 0
    assert all(g.abs().sum() == 0 for name in zero_at_init for g in adapter_grads(model, name))
    model.zero_grad()
    perturb(model)
    training_loss(model, batch, task_ids=ids).backward()
    for name in ("moelora_A", "moelora_B", "moelora_gate"):
        assert all(g.abs().sum() > 0 for g in adapter_grads(model, name)), name
    for g in adapter_grads(model, "moelora_task_embedding"):
        assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0 and g[1].abs().sum() == 0


def test_task_factors_state_each_tasks_weight_change():
    layer = make_layer()
    A, B = layer.moelora_A["default"], layer.moelora_B["default"]
    G, E = layer.moelora_gate["default"].weight, layer.moelora_task_embedding["default"]
    for task in range(3):
        w = torch.softmax(G @ E[task], dim=0)
        delta = (12 / 6) * sum(w[i] * B[:, 2 * i : 2 * i + 2] @ A[2 * i : 2 * i + 2] for i in range(3))
        up, down = layer.task_lora_factors("default", task)
        assert up.shape == (7, 6) and down.shape == (6, 10)
        torch.testing.assert_close(up @ down, delta, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_generate_with_beams_routes_each_example(family):
    model = tiny(family)
    perturb(model, scale=0.5)
    batch = tiny_batch(family)
    together = generate_with_beams(model, family, task_ids=IDS)
    assert together.shape[0] == 4
    # the beams of each example follow that example's task: same sequences as generating it alone
    for n in (0, 2):  # tasks 2 and 1
        alone = model.generate(
            input_ids=batch["input_ids"][n : n + 1],
            attention_mask=batch["attention_mask"][n : n + 1],
            task_ids=IDS[n : n + 1],
            num_beams=2,
            max_new_tokens=3,
            do_sample=False,
        )
        assert torch.equal(alone[0], together[n, : alone.shape[1]])


def test_parameter_count_matches_formula(family):
    model = tiny(family)
    counts = count_parameters(model)
    r, num_experts, dim, tasks = 4, 2, 8, 3
    shapes = adapted_shapes(model)
    assert counts["adapter"] == sum(r * (d_in + d_out) for d_in, d_out in shapes)
    assert counts["router"] == len(shapes) * dim * num_experts
    assert counts["task_embedding"] == len(shapes) * tasks * dim
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_t5_base_counts_with_default_settings():
    model = get_peft_model(t5_base_skeleton(), MoeLoraConfig(target_modules=T5_BASE_TARGETS, num_tasks=8))
    counts = count_parameters(model)
    assert counts["modules"] == 192
    assert counts["adapter"] == 2 * 3_244_032 == 6_488_064  # rank 16 = twice LoRA-r8
    assert counts["router"] == 192 * 64 * 8 == 98_304
    assert counts["task_embedding"] == 192 * 8 * 64 == 98_304
    assert counts["per_task_without_router"] == 811_008  # the EPT paper's Table 2 "0.81M"
    assert counts["per_task"] == 835_584


def test_registered_by_name():
    config = make_peft_config("moelora", target_modules=["q"])
    assert isinstance(config, MoeLoraConfig) and config.peft_type == "MOELORA"
