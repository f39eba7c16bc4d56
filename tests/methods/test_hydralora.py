"""HydraLoRA: float64 parity, per-token routing, not mergeable, gradients, task-independence, counts."""

import math

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
from pyramid_peft import count_parameters, make_peft_config
from pyramid_peft.methods.hydralora import HydraLoraConfig
from pyramid_peft.methods.hydralora.layer import Linear
from pyramid_peft.routing import TaskRoute

IDS = torch.tensor([2, 0, 1, 0])


def tiny(family, **overrides):
    settings = dict(num_tasks=3, r=2, num_heads=3, lora_dropout=0.0)
    settings.update(overrides)
    return peft_tiny(family, HydraLoraConfig(**settings))


def make_layer(d_in=10, d_out=7):
    torch.manual_seed(0)
    config = HydraLoraConfig(target_modules=["x"], r=3, num_heads=4, lora_alpha=6, lora_dropout=0.0)
    layer = Linear(nn.Linear(d_in, d_out), "default", config, route=TaskRoute(1, "HydraLoRA")).double()
    with torch.no_grad():
        layer.hydralora_B["default"].normal_()
    return layer


def reference_token(layer, x):
    """W0 x + b0 + (alpha/r) sum_i softmax(W_r x)_i B_i A x for one token x, from the layer's raw tensors."""
    A, B = layer.hydralora_A["default"], layer.hydralora_B["default"]
    g = torch.softmax(layer.hydralora_router["default"].weight @ x, dim=0)
    delta = sum(g[i] * B[:, 3 * i : 3 * i + 3] @ A for i in range(4))
    return layer.base_layer.weight @ x + layer.base_layer.bias + (6 / 3) * delta @ x


def test_forward_equals_float64_reference():
    layer = make_layer()
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    out = layer(x)  # no task ids: routing reads the tokens
    for n in range(2):
        for t in range(5):
            torch.testing.assert_close(out[n, t], reference_token(layer, x[n, t]), rtol=0, atol=1e-12)


def test_two_tokens_of_one_example_get_different_mixtures():
    layer = make_layer()
    x = torch.randn(1, 2, 10, dtype=torch.float64)
    weights = layer.route_weights("default", x)
    assert not torch.allclose(weights[0, 0], weights[0, 1], atol=1e-3)
    out = layer(x)
    for t in range(2):  # each token's output is its own mixture: the same as routing that token alone
        torch.testing.assert_close(out[0, t], layer(x[:, t : t + 1])[0, 0], rtol=0, atol=1e-12)
    # and not the other token's mixture
    A, B = layer.hydralora_A["default"], layer.hydralora_B["default"]
    swapped = layer.base_layer(x[0, 1]) + (6 / 3) * sum(
        weights[0, 0, i] * B[:, 3 * i : 3 * i + 3] @ (A @ x[0, 1]) for i in range(4)
    )
    assert not torch.allclose(out[0, 1], swapped, atol=1e-6)


def test_initialisation():
    config = HydraLoraConfig(target_modules=["x"])
    layer = Linear(nn.Linear(512, 256), "default", config, route=TaskRoute(1, "HydraLoRA"))
    A, B, router = layer.hydralora_A["default"], layer.hydralora_B["default"], layer.hydralora_router["default"]
    assert A.shape == (8, 512) and B.shape == (256, 4 * 8) and router.weight.shape == (4, 512)
    assert router.bias is None and B.abs().sum() == 0
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) on fan-in 512
    for tensor in (A, router.weight):
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.95 * bound


def test_output_equals_base_at_init(family):
    assert_equals_base(tiny(family), tiny_batch(family))


def test_heads_learn_first_then_every_part(family):
    model = tiny(family)
    batch = tiny_batch(family)
    training_loss(model, batch).backward()
    assert all(g.abs().sum() > 0 for g in adapter_grads(model, "hydralora_B"))
    assert all(g.abs().sum() == 0 for name in ("hydralora_A", "hydralora_router") for g in adapter_grads(model, name))
    model.zero_grad()
    perturb(model)
    training_loss(model, batch).backward()
    for name in ("hydralora_A", "hydralora_B", "hydralora_router"):
        assert all(g.abs().sum() > 0 for g in adapter_grads(model, name)), name


def test_task_ids_are_accepted_and_ignored(family):
    model = tiny(family)
    perturb(model)
    batch = tiny_batch(family)
    without = main_output(model, batch)
    torch.testing.assert_close(main_output(model, batch, task_ids=IDS), without, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_generate_with_beams(family):
    model = tiny(family)
    perturb(model)
    assert generate_with_beams(model, family, task_ids=IDS).shape[0] == 4


def test_parameter_count_matches_formula(family):
    model = tiny(family)
    counts = count_parameters(model)
    r, heads = 2, 3
    shapes = adapted_shapes(model)
    assert counts["adapter"] == sum(r * d_in + heads * r * d_out for d_in, d_out in shapes)
    assert counts["router"] == sum(heads * d_in for d_in, _ in shapes)
    assert counts["task_embedding"] == 0
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_t5_base_counts_with_default_settings():
    model = get_peft_model(t5_base_skeleton(), HydraLoraConfig(target_modules=T5_BASE_TARGETS, num_tasks=8))
    counts = count_parameters(model)
    # sum of d_in = sum of d_out = 202,752 over the 192 modules
    assert counts["modules"] == 192
    assert counts["adapter"] == 8 * 202_752 + 4 * 8 * 202_752 == 8_110_080
    assert counts["router"] == 4 * 202_752 == 811_008
    assert counts["total"] == 8_921_088 and counts["per_task"] == 1_115_136


def test_registered_by_name():
    config = make_peft_config("hydralora", target_modules=["q"])
    assert isinstance(config, HydraLoraConfig) and config.peft_type == "HYDRALORA"
