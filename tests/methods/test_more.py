"""MoRE: float64 parity of nested-rank experts, the straight-through selector (intended) versus the frozen route
(reference), mixed-task batches, the contrastive loss, save/reload, merge/export per task, beams and counts."""

import pytest
import torch
import torch.nn.functional as F
from _models import (
    T5_BASE_TARGETS,
    adapted_shapes,
    adapter_grads,
    assert_equals_base,
    assert_save_reload_exact,
    generate_with_beams,
    main_output,
    peft_tiny,
    perturb,
    t5_base_skeleton,
    training_loss,
)
from peft import PeftModel, get_peft_model
from torch import nn

import pyramid_peft
from conftest import TINY_BUILDERS, TINY_TARGETS, tiny_batch
from pyramid_peft import count_parameters, make_peft_config
from pyramid_peft.methods.more import MoreConfig
from pyramid_peft.methods.more.layer import Linear
from pyramid_peft.routing import TaskRoute

IDS = torch.tensor([2, 0, 1, 0])
R, ALPHA = 4, 8


def tiny(family, **overrides):
    settings = dict(num_tasks=3, r=R, lora_alpha=ALPHA, lora_dropout=0.0)
    settings.update(overrides)
    return peft_tiny(family, MoreConfig(**settings))


def trained(model, seed: int = 0):
    """Non-zero B (as after training) and sharp selectors, so tasks pick different nested ranks."""
    perturb(model, scale=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in model.base_model.routed_layers():
            table = layer.more_task_embedding["default"]
            table.copy_(torch.randn(table.shape, generator=g))
    return model


def choices(model) -> list[torch.Tensor]:
    return [layer.task_choices("default") for _, layer in model.base_model.routed_layers()]


# -- the independent float64 reference ------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts,rank_scale", [(None, True), (2, True), (None, False)])
def test_nested_rank_forward_equals_float64_reference(num_experts, rank_scale):
    torch.manual_seed(0)
    r, tasks = 6, 4
    config = MoreConfig(
        target_modules=["x"],
        num_tasks=tasks,
        r=r,
        lora_alpha=3.0,
        lora_dropout=0.0,
        num_experts=num_experts,
        rank_scale=rank_scale,
    )
    route = TaskRoute(tasks, "MoRE")
    layer = Linear(nn.Linear(10, 7), "default", config, route=route).double()
    with torch.no_grad():
        layer.more_B["default"].normal_()
        layer.more_task_embedding["default"].normal_()
    x = torch.randn(4, 5, 10, dtype=torch.float64)
    ids = torch.tensor([3, 0, 1, 3])
    with route.call(ids):
        out = layer(x)

    A, B = layer.more_A["default"], layer.more_B["default"]
    gate, table = layer.more_gate["default"], layer.more_task_embedding["default"]
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    E = num_experts or r
    s = torch.arange(1, r + 1, dtype=torch.float64) / r if rank_scale else torch.ones(r, dtype=torch.float64)
    picked = set()
    for row, task in enumerate(ids.tolist()):
        probs = torch.softmax(table[task] @ gate.weight.T + gate.bias, dim=-1)
        expert = int(probs.argmax())  # 0-based; expert e+1 of E has rank (e+1) r / E
        rank = (expert + 1) * r // E
        picked.add(rank)
        delta = (B[:, :rank] * s[:rank]) @ (s[:rank, None] * A[:rank])
        expected = x[row] @ W0.T + b0 + (3.0 / r) * x[row] @ delta.T
        torch.testing.assert_close(out[row], expected, rtol=0, atol=1e-12)
    assert len(picked) > 1  # the rows really use different nested ranks


def test_output_equals_base_at_init(family):
    """B = 0: the adapted model is the base model."""
    assert_equals_base(tiny(family), tiny_batch(family), task_ids=IDS)


def test_missing_task_ids_fail_clearly():
    with pytest.raises(pyramid_peft.TaskRoutingError, match="task_ids"):
        main_output(tiny("llama"), tiny_batch("llama"))


# -- the selector: straight-through (intended) versus frozen (reference) --------------------------------------
def test_straight_through_gradient_reaches_the_gate_and_task_embedding():
    model = trained(tiny("t5", contrastive_weight=0.0))
    model(**tiny_batch("t5"), task_ids=IDS).loss.backward()
    for container in ("more_gate", "more_task_embedding"):
        grads = adapter_grads(model, container)
        assert grads and all(g.abs().sum() > 0 for g in grads), container


def test_reference_mode_gate_gets_no_gradient_and_embeddings_learn_only_from_the_contrastive_loss():
    model = trained(tiny("t5", route_mode="reference"))
    batch = tiny_batch("t5")
    model(**batch, task_ids=IDS).loss.backward()
    for container in ("more_gate", "more_task_embedding"):
        assert all(g.abs().sum() == 0 for g in adapter_grads(model, container)), container
    model.zero_grad()
    model(**batch, task_ids=IDS)
    pyramid_peft.aux_loss(model).backward()
    assert all(g.abs().sum() == 0 for g in adapter_grads(model, "more_gate"))
    encoder = [layer for name, layer in model.base_model.routed_layers() if ".encoder." in f".{name}"]
    assert all(layer.more_task_embedding["default"].grad.abs().sum() > 0 for layer in encoder)


def test_straight_through_factor_is_exactly_one_forward():
    """Intended and reference modes give identical outputs while the reference map equals today's argmax."""
    batch = tiny_batch("t5")
    intended = trained(tiny("t5"))
    reference = trained(tiny("t5", route_mode="reference"))
    reference.load_state_dict(intended.state_dict(), strict=False)
    out = main_output(intended, batch, task_ids=IDS)
    torch.testing.assert_close(main_output(reference, batch, task_ids=IDS), out, rtol=0, atol=0)


def test_reference_route_freezes_per_module_and_task_on_first_forward_and_reloads(tmp_path):
    model = trained(tiny("llama", route_mode="reference"))
    layers = [layer for _, layer in model.base_model.routed_layers()]
    assert all(bool((layer.more_route_map["default"] == -1).all()) for layer in layers)
    main_output(model, tiny_batch("llama"), task_ids=torch.tensor([0, 0, 2, 2]))
    maps = [layer.more_route_map["default"].clone() for layer in layers]
    assert all(m[1] == -1 and m[0] >= 0 and m[2] >= 0 for m in maps)  # task 1 not seen yet
    # move every selector far away: the frozen tasks keep their expert, the intended mode would follow the gate
    with torch.no_grad():
        for layer in layers:
            layer.more_gate["default"].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    main_output(model, tiny_batch("llama"), task_ids=IDS)
    for layer, before in zip(layers, maps):
        now = layer.more_route_map["default"]
        assert now[0] == before[0] and now[2] == before[2] and now[1] == 3
    assert_save_reload_exact(model, "llama", tmp_path, task_ids=IDS)
    reloaded = PeftModel.from_pretrained(TINY_BUILDERS["llama"](), tmp_path)
    for (_, layer), before in zip(reloaded.base_model.routed_layers(), layers):
        assert torch.equal(layer.more_route_map["default"], before.more_route_map["default"])


def test_mixed_batch_equals_task_homogeneous_batches(family):
    model = trained(tiny(family))
    batch = tiny_batch(family)
    mixed = main_output(model, batch, task_ids=IDS)
    for task in IDS.unique().tolist():
        alone = main_output(model, batch, task_ids=torch.full_like(IDS, task))
        rows = task == IDS
        torch.testing.assert_close(mixed[rows], alone[rows], rtol=0, atol=1e-6)
    assert len({tuple(c.tolist()) for c in choices(model)}) > 1


# -- contrastive task-embedding loss --------------------------------------------------------------------------
@pytest.mark.parametrize("family,expect_encoder_only", [("t5", True), ("llama", False)])
def test_contrastive_loss_equals_reference(family, expect_encoder_only):
    model = trained(tiny(family, contrastive_weight=0.3, contrastive_tau=0.5))
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, layer in model.base_model.routed_layers()
    ]
    main_output(model, tiny_batch(family), task_ids=IDS)
    for hook in hooks:
        hook.remove()
    terms = []
    for name, layer in model.base_model.routed_layers():
        if expect_encoder_only and ".encoder." not in f".{name}":
            continue
        h = inputs[name][:, 0].double()
        E = layer.more_task_embedding["default"].detach().double()
        sims = (h / h.norm(dim=-1, keepdim=True)) @ (E / E.norm(dim=-1, keepdim=True)).T
        terms.append(F.cross_entropy(sims / 0.5, IDS))
    assert len(terms) == 12  # 2 blocks x 6 targets: T5's encoder only, every LLaMA module
    expected = 0.3 * torch.stack(terms).mean()
    torch.testing.assert_close(pyramid_peft.aux_loss(model).double(), expected, rtol=1e-5, atol=1e-6)


def test_a_second_adapter_gets_the_same_contrastive_modules_as_the_first():
    model = tiny("t5", contrastive_weight=0.3)
    model.add_adapter(
        "second", MoreConfig(num_tasks=3, r=R, contrastive_weight=0.3, target_modules=set(TINY_TARGETS["t5"]))
    )
    layers = dict(model.base_model.routed_layers())
    flags = {
        adapter: {n for n, layer in layers.items() if layer.more_contrastive[adapter]}
        for adapter in ("default", "second")
    }
    assert flags["default"] == flags["second"] == {n for n in layers if ".encoder." in f".{n}"}


# -- the common contract --------------------------------------------------------------------------------------
def test_backward_reaches_every_trainable_tensor(family):
    model = trained(tiny(family)).train()
    loss = training_loss(model, tiny_batch(family), task_ids=IDS) + pyramid_peft.aux_loss(model)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".more_" in n for n in trainable)
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family,route_mode", [("t5", "intended"), ("llama", "reference")])
def test_generate_with_beams(family, route_mode):
    model = trained(tiny(family, route_mode=route_mode))
    out = generate_with_beams(model, family, task_ids=IDS)
    assert out.shape[0] == 4
    # row i depends only on example i and its task: generating it alone gives the same tokens
    single = generate_with_beams(model, family, task_ids=torch.full_like(IDS, 1))
    assert torch.equal(out[IDS == 1], single[IDS == 1])


# -- accounting -----------------------------------------------------------------------------------------------
def test_parameter_count_matches_formula(family):
    model = tiny(family)
    counts = count_parameters(model)
    shapes = adapted_shapes(model)
    tasks, experts = 3, R
    # r(d_in + d_out) + gate (E d_in + E) + task-embedding table (T d_in)
    assert counts["adapter"] == sum(R * (d_in + d_out) for d_in, d_out in shapes)
    assert counts["router"] == sum(experts * d_in + experts for d_in, _ in shapes)
    assert counts["task_embedding"] == sum(tasks * d_in for d_in, _ in shapes)
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_t5_base_totals_match_the_paper():
    model = get_peft_model(t5_base_skeleton(), MoreConfig(target_modules=T5_BASE_TARGETS, num_tasks=8, r=8))
    counts = count_parameters(model)
    assert counts["modules"] == 192
    assert counts["adapter"] == 3_244_032  # LoRA r=8
    assert counts["router"] + counts["task_embedding"] == 3_245_568
    assert counts["total"] == 6_489_600 and counts["per_task"] == 811_200  # MoRE's 0.81M/task (arXiv 2505.22694)


# -- configuration --------------------------------------------------------------------------------------------
def test_expert_ranks():
    assert MoreConfig(r=8).expert_ranks == list(range(1, 9))
    assert MoreConfig(r=8, num_experts=4).expert_ranks == [2, 4, 6, 8]
    assert MoreConfig(r=8, num_experts=3).expert_ranks == [2, 5, 8]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"r": 0}, "r=0"),
        ({"num_experts": 9}, "num_experts=9"),
        ({"route_mode": "frozen"}, "route_mode"),
        ({"contrastive_pooling": "last"}, "contrastive_pooling"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoreConfig(target_modules=["q"], **overrides)


def test_registered_by_name():
    config = make_peft_config("more", target_modules=["q"], route_mode="reference")
    assert isinstance(config, MoreConfig) and config.peft_type == "MORE" and config.num_experts == 8
