"""MultiLoRA: float64 parity, zero change at init, scalar gradients, task-independence, merge/export, counts."""

import math

import pytest
import torch
from _models import (
    T5_BASE_TARGETS,
    adapted_shapes,
    adapter_grads,
    assert_equals_base,
    assert_merge_and_export_match,
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
from pyramid_peft.merge import task_factors
from pyramid_peft.methods.multilora import MultiLoraConfig
from pyramid_peft.methods.multilora.layer import Linear
from pyramid_peft.routing import TaskRoute

IDS = torch.tensor([2, 0, 1, 0])


def tiny(family, **overrides):
    settings = dict(num_tasks=3, r=2, num_loras=3, lora_dropout=0.0)
    settings.update(overrides)
    return peft_tiny(family, MultiLoraConfig(**settings))


def test_forward_equals_float64_reference():
    torch.manual_seed(0)
    config = MultiLoraConfig(target_modules=["x"], r=3, num_loras=4, lora_alpha=6, lora_dropout=0.0)
    layer = Linear(nn.Linear(10, 7), "default", config, route=TaskRoute(1, "MultiLoRA")).double()
    with torch.no_grad():
        layer.multilora_scales["default"].normal_()
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    A, B = layer.multilora_A["default"], layer.multilora_B["default"]
    s = layer.multilora_scales["default"]
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    delta = sum(s[i] * B[:, 3 * i : 3 * i + 3] @ A[3 * i : 3 * i + 3] for i in range(4))
    expected = x @ W0.T + b0 + (6 / 3) * x @ delta.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_initialisation_is_kaiming_with_zero_scales():
    config = MultiLoraConfig(target_modules=["x"], r=8, num_loras=4)
    layer = Linear(nn.Linear(512, 256), "default", config, route=TaskRoute(1, "MultiLoRA"))
    A, B = layer.multilora_A["default"], layer.multilora_B["default"]
    assert A.shape == (32, 512) and B.shape == (256, 32)
    assert A.abs().max() <= 1 / math.sqrt(512) and A.abs().max() > 0.95 / math.sqrt(512)
    for piece in B.split(8, dim=1):  # each B_i has fan-in r, not n*r
        assert piece.abs().max() <= 1 / math.sqrt(8) and piece.abs().max() > 0.95 / math.sqrt(8)
    assert torch.equal(layer.multilora_scales["default"], torch.zeros(4))


def test_output_equals_base_at_init(family):
    assert_equals_base(tiny(family), tiny_batch(family))


def test_scales_take_the_first_gradient_then_every_factor_learns(family):
    model = tiny(family)
    batch = tiny_batch(family)
    training_loss(model, batch).backward()
    assert all(g.abs().sum() > 0 for g in adapter_grads(model, "multilora_scales"))
    # with s = 0 the factors' gradients are exactly zero until the scalars move
    assert all(g.abs().sum() == 0 for g in adapter_grads(model, "multilora_A") + adapter_grads(model, "multilora_B"))
    model.zero_grad()
    perturb(model)
    training_loss(model, batch).backward()
    for name in ("multilora_A", "multilora_B", "multilora_scales"):
        assert all(g.abs().sum() > 0 for g in adapter_grads(model, name)), name


def test_task_ids_are_accepted_and_ignored(family):
    model = tiny(family)
    perturb(model)
    batch = tiny_batch(family)
    without = main_output(model, batch)
    torch.testing.assert_close(main_output(model, batch, task_ids=IDS), without, rtol=0, atol=0)
    torch.testing.assert_close(
        main_output(model, batch, task_ids=torch.zeros(4, dtype=torch.long)), without, rtol=0, atol=0
    )


def test_merge_and_export_reproduce_the_model_for_any_task(tmp_path, family):
    model = tiny(family)
    perturb(model)
    report = assert_merge_and_export_match(model, family, tmp_path, 2, task_ids=IDS)
    assert report["max_layer_rank"] == 3 * 2 and report["relative_error"] == 0.0
    for name, (up, down) in task_factors(model, 0).items():  # every task states the same change
        up2, down2 = task_factors(model, 2)[name]
        assert torch.equal(up, up2) and torch.equal(down, down2)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_generate_with_beams(family):
    model = tiny(family)
    perturb(model)
    out = generate_with_beams(model, family, task_ids=IDS)
    assert out.shape[0] == 4


def test_parameter_count_matches_formula(family):
    model = tiny(family)
    counts = count_parameters(model)
    n, r = 3, 2
    assert counts["adapter"] == sum(n * r * (d_in + d_out) + n for d_in, d_out in adapted_shapes(model))
    assert counts["router"] == counts["task_embedding"] == 0
    assert counts["adapter"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_t5_base_counts_with_default_settings():
    model = get_peft_model(t5_base_skeleton(), MultiLoraConfig(target_modules=T5_BASE_TARGETS, num_tasks=8))
    counts = count_parameters(model)
    # 4 LoRAs of rank 8 over 192 modules: 4 x 3,244,032 (LoRA-r8) + 4 scalars per module
    assert counts["modules"] == 192
    assert counts["adapter"] == counts["total"] == 4 * 3_244_032 + 4 * 192 == 12_976_896
    assert counts["per_task"] == 1_622_112


@pytest.mark.parametrize(
    "overrides,message",
    [({"r": 0}, "r=0"), ({"num_loras": 0}, "num_loras=0"), ({"lora_dropout": 1.0}, "lora_dropout")],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        MultiLoraConfig(target_modules=["q"], **overrides)


def test_registered_by_name():
    config = make_peft_config("multilora", target_modules=["q"])
    assert isinstance(config, MultiLoraConfig) and config.peft_type == "MULTILORA"
