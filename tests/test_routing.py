"""Task routing through stock PEFT: forward, generate (beams), gradient checkpointing, stale routes, errors."""

import pytest
import torch
from peft import get_peft_model

from conftest import TINY_BUILDERS, TINY_TARGETS, tiny_batch
from pyramid_peft import EptConfig, TaskRoutingError, aux_loss


def ept_model(family, **overrides):
    settings = dict(
        target_modules=TINY_TARGETS[family], num_tasks=3, r=4, kernel_sizes=[2, 2, 4, 4], top_k=2, lora_dropout=0.0
    )
    settings.update(overrides)
    model = get_peft_model(TINY_BUILDERS[family](), EptConfig(**settings))
    with torch.no_grad():  # move away from the identity init (B = 0 by default) so routes matter
        for name, param in model.named_parameters():
            if "ept_kernels" in name:
                param.normal_(std=0.5)
            elif "ept_B" in name:
                param.normal_(std=0.25)  # the scale of the Gaussian init (1/r)
    return model


def test_task_ids_reach_every_layer_and_mixed_batches_split_exactly(family):
    model = ept_model(family).eval()
    batch = tiny_batch(family)
    ids = torch.tensor([0, 2, 1, 2])
    key = "logits" if family != "bert" else "last_hidden_state"
    mixed = model(**batch, task_ids=ids)[key]
    for i, task in enumerate(ids.tolist()):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        alone = model(**single, task_ids=torch.tensor([task]))[key]
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    other = model(**batch, task_ids=torch.tensor([1, 1, 1, 1]))[key]
    assert not torch.allclose(mixed, other)


def test_missing_and_out_of_range_task_ids_raise_clear_errors():
    model = ept_model("t5")
    batch = tiny_batch("t5")
    with pytest.raises(TaskRoutingError, match="call the model with task_ids"):
        model(**batch)
    with pytest.raises(TaskRoutingError, match=r"task_ids \[5\] are outside \[0, 3\)"):
        model(**batch, task_ids=torch.tensor([0, 1, 5, 2]))
    model(**batch, task_ids=torch.tensor([0, 1, 2, 2]))  # a good call after the errors still works


def test_a_stale_route_is_never_reused():
    model = ept_model("llama")
    batch = tiny_batch("llama")
    model(**batch, task_ids=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TaskRoutingError):
        model.get_base_model()(**batch)  # bypassing the wrapper after a routed call
    with pytest.raises(TaskRoutingError):
        model(**batch)


def checkpointed_grads(family, checkpointing, reentrant, **overrides):
    model = ept_model(family, **overrides).train()
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    out = model(**tiny_batch(family), task_ids=torch.tensor([0, 1, 2, 1]))
    (out.loss + aux_loss(model)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_plain_backward(family, reentrant):
    # Reentrant checkpointing runs each segment without autograd, so the contrastive loss cannot reach the layer
    # inputs through it: compare that mode without the contrastive term (it is checked separately below).
    overrides = {"contrastive_weight": 0.0} if reentrant else {}
    plain = checkpointed_grads(family, False, reentrant, **overrides)
    checkpointed = checkpointed_grads(family, True, reentrant, **overrides)
    assert plain.keys() == checkpointed.keys() and any("ept_kernels" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reentrant_checkpointing_still_trains_the_task_embeddings():
    grads = checkpointed_grads("t5", True, True)
    tables = [g for n, g in grads.items() if "ept_task_embedding" in n and ".encoder." in n]
    assert tables and all(g.abs().sum() > 0 for g in tables)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_beam_search_and_returned_sequences_route_per_example(family):
    model = ept_model(family).eval()
    batch = tiny_batch(family)
    ids = torch.tensor([0, 2, 1, 2])
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=torch.ones_like(batch["input_ids"]),
        num_beams=3,
        num_return_sequences=2,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
    )
    together = model.generate(**kwargs, task_ids=ids)
    assert together.shape[0] == 8
    for i, task in enumerate(ids.tolist()):
        single = {k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        alone = model.generate(**single, task_ids=torch.tensor([task]))
        torch.testing.assert_close(together[2 * i : 2 * i + 2, : alone.shape[1]], alone)


def test_generate_without_task_ids_raises():
    model = ept_model("t5").eval()
    with pytest.raises(TaskRoutingError):
        model.generate(input_ids=tiny_batch("t5")["input_ids"], max_new_tokens=2)


def test_token_routing_needs_no_task_ids():
    model = ept_model("bert", router_input="token", contrastive_weight=0.0).eval()
    batch = tiny_batch("bert")
    assert model(**batch).last_hidden_state.shape == (4, 7, 32)


def test_constants_are_buffers_that_move_with_the_model_and_are_not_saved():
    model = ept_model("llama", dim_scale="coord_lin", kernel_sizes=[4, 2, 4, 2])  # ALP scales, expert order
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert {"ept_scale_A.default", "ept_scale_B.default", "ept_expert_order.default"} <= dict(
        layer.named_buffers()
    ).keys()
    assert not any("ept_scale" in key or "ept_expert_order" in key for key in model.state_dict())
    model.to(torch.float64)
    assert layer.ept_scale_A["default"].dtype == layer.ept_A["default"].dtype == torch.float64


def routed_llama():
    """An EPT LLaMA in eval mode, a batch for it, task ids for the batch and the model's routed layers."""
    model = ept_model("llama").eval()
    layers = [layer for _, layer in model.base_model.routed_layers()]
    return model, tiny_batch("llama"), torch.tensor([0, 2, 1, 2]), layers


def counted(monkeypatch, cls, name: str) -> list:
    """A list that grows by one at every call of ``cls.name`` (patched for the test)."""
    calls, original = [], getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_factors_are_built_once_per_call_and_rebuilt_when_a_weight_changes(monkeypatch):
    model, batch, ids, layers = routed_llama()
    builds = counted(monkeypatch, type(layers[0]), "_group_kernels")
    route = model.base_model.route
    with torch.no_grad(), route.generation(), route.call(ids, batch["attention_mask"]):  # as inside generate
        first = model.get_base_model()(**batch).logits
        per_forward = len(builds)
        again = model.get_base_model()(**batch).logits  # a decoding step of the same call: nothing rebuilt
        assert len(builds) == per_forward > 0 and torch.equal(first, again)
        for layer in layers:
            layer.ept_kernels["default"].mul_(-1.0)  # what an optimiser step between two steps would do
        changed = model.get_base_model()(**batch).logits
        assert len(builds) == 2 * per_forward
    with torch.no_grad():
        fresh = model(**batch, task_ids=ids).logits
    torch.testing.assert_close(changed, fresh)
    assert not torch.allclose(changed, first)


def test_a_forward_plans_its_route_once():
    """The wrapper's pre-hook opens the call; PEFT's own hook context inside it, given the same ids, inherits it."""
    model = ept_model("llama").eval()
    route = model.base_model.route
    plans, planner = [], route.planner
    route.planner = lambda call: plans.append(call) or planner(call)
    with torch.no_grad():
        model(**tiny_batch("llama"), task_ids=torch.tensor([0, 2, 1, 2]))
    assert len(plans) == 1


def test_later_calls_reuse_the_plan_until_the_router_changes(monkeypatch):
    model, batch, ids, layers = routed_llama()
    tables = counted(monkeypatch, type(layers[0]), "task_weights")

    def planned_afresh():
        for layer in layers:
            layer._known_routes.clear()
        return model(**batch, task_ids=ids).logits

    with torch.no_grad():
        first = model(**batch, task_ids=ids).logits
        per_plan = len(tables)
        assert model(**batch, task_ids=ids).logits.equal(first) and len(tables) == per_plan > 0  # nothing recomputed
        for layer in layers:
            layer.ept_task_embedding["default"].mul_(-1.0)  # an optimiser step between two calls
        changed = model(**batch, task_ids=ids).logits
        assert len(tables) == 2 * per_plan and not torch.allclose(changed, first)
        torch.testing.assert_close(changed, planned_afresh(), rtol=0, atol=0)
        model.to(torch.float64)  # new storage, same versions
        moved = model(**batch, task_ids=ids).logits
        assert moved.dtype == torch.float64 and len(tables) == 4 * per_plan
        torch.testing.assert_close(moved, planned_afresh(), rtol=0, atol=0)
        torch.testing.assert_close(moved.float(), changed, rtol=1e-5, atol=1e-5)


def test_generate_builds_the_factors_once_for_all_its_steps(monkeypatch):
    model = ept_model("llama").eval()
    layer_cls = type(next(layer for _, layer in model.base_model.routed_layers()))
    builds = counted(monkeypatch, layer_cls, "_group_kernels")
    batch = tiny_batch("llama")
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False, pad_token_id=0)
    model.generate(**kwargs, max_new_tokens=1, min_new_tokens=1, task_ids=torch.tensor([0, 2, 1, 2]))
    one_step = len(builds)
    model.generate(**kwargs, max_new_tokens=6, min_new_tokens=6, task_ids=torch.tensor([0, 2, 1, 2]))
    assert len(builds) == 2 * one_step  # six decoding steps cost what one does
