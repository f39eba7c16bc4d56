"""MixLoRA: float64 parity of the FFN mixture with an independent per-token reference (LLaMA, T5, gated T5, BERT),
token routing (only routed experts run), the Switch balance loss, gradients, save/reload, beams, accounting, and
the not-mergeable contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from _models import generate_with_beams, main_output, perturb, training_loss
from peft import get_peft_model
from transformers import T5Config, T5ForConditionalGeneration

import pyramid_peft
from conftest import TINY_BUILDERS, tiny_batch
from pyramid_peft import Merging, NotMergeableError, Routing, count_parameters, export_lora, merge_for_task
from pyramid_peft.gating import switch_balance_loss, topk_softmax
from pyramid_peft.methods.mixlora import ExpertOutput, FeedForward, MixLoraConfig
from pyramid_peft.registry import make_peft_config, method_names

E, R, ALPHA, K = 4, 4, 8, 2  # experts, rank, alpha (scale 2), top-k
D, D_FF = 32, 64  # tiny models' d_model and FFN width (conftest)


def build_gated_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=96,
        d_model=D,
        d_ff=D_FF,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        d_kv=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        feed_forward_proj="gated-gelu",
    )
    return T5ForConditionalGeneration(config).eval()


BUILDERS = {**TINY_BUILDERS, "t5_gated": build_gated_t5}
TASK_TYPES = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "t5_gated": "SEQ_2_SEQ_LM", "bert": None}


def mixlora(family: str, seed: int = 0, **overrides):
    settings = dict(num_tasks=3, r=R, lora_alpha=ALPHA, lora_dropout=0.0, num_experts=E, top_k=K)
    settings.update(overrides)
    config = MixLoraConfig(task_type=TASK_TYPES[family], **settings)
    return get_peft_model(BUILDERS[family](seed), config).eval()


def trained(model, seed: int = 0):
    """Non-zero B factors (as after training) and a sharp router, so experts differ and routes vary per token."""
    perturb(model, scale=0.2, seed=seed)
    with torch.no_grad():
        for layer in ffn_layers(model):
            layer.mixlora_router["default"].normal_(std=1.0)
    return model


def ffn_layers(model) -> list[FeedForward]:
    return [m for m in model.modules() if isinstance(m, FeedForward)]


def hidden_rows(seed: int = 3, n: int = 10) -> torch.Tensor:
    return torch.randn(2, n // 2, D, generator=torch.Generator().manual_seed(seed))


# -- the independent float64 reference ------------------------------------------------------------------------
def reference_route(x: torch.Tensor, router: torch.Tensor, k: int):
    """softmax(W_r x), top-k, renormalised over the chosen experts: [(experts, weights)] per row."""
    probs = torch.softmax(x @ router.T, dim=-1)
    routes = []
    for row in probs:
        top = torch.topk(row, k).indices
        routes.append((top.tolist(), row[top] / row[top].sum()))
    return routes


def expert_linear(layer, name: str, expert: int, linear: torch.nn.Linear):
    """u -> W u + b + (alpha/r) B_e A_e u in float64, from the layer's raw tensors."""
    A = layer.mixlora_expert_A["default"][name][expert].double()
    B = layer.mixlora_expert_B["default"][name][expert].double()
    W = linear.weight.double()
    b = linear.bias.double() if linear.bias is not None else 0.0
    return lambda u: u @ W.T + b + (ALPHA / R) * (u @ A.T) @ B.T


def reference_ffn(family: str, ffn_layer, x: torch.Tensor, out_layer=None) -> torch.Tensor:
    """sum_{e in TopK(x)} w_e FFN_e(x), one row and one chosen expert at a time (whole FFN per expert)."""
    ffn = ffn_layer.base_layer
    x = x.reshape(-1, x.shape[-1]).double()

    def lin(name, e):
        return expert_linear(ffn_layer, name, e, getattr(ffn, name))

    def expert_ffn(e, u):
        if family == "llama":
            return lin("down_proj", e)(F.silu(lin("gate_proj", e)(u)) * lin("up_proj", e)(u))
        if family == "t5":
            return lin("wo", e)(torch.relu(lin("wi", e)(u)))
        if family == "t5_gated":
            return lin("wo", e)(F.gelu(lin("wi_0", e)(u), approximate="tanh") * lin("wi_1", e)(u))
        dense_out = expert_linear(out_layer, "dense", e, out_layer.base_layer)
        return dense_out(F.gelu(lin("dense", e)(u)))

    rows = []
    for u, (experts, weights) in zip(x, reference_route(x, ffn_layer.mixlora_router["default"].double(), K)):
        rows.append(sum(w * expert_ffn(e, u) for e, w in zip(experts, weights)))
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["llama", "t5", "t5_gated", "bert"])
def test_ffn_mixture_matches_float64_reference(family):
    model = trained(mixlora(family))
    x = hidden_rows()
    layer = ffn_layers(model)[0]
    if family == "bert":
        block = model.base_model.model.encoder.layer[0]
        out_layer = block.output.dense
        assert isinstance(out_layer, ExpertOutput)
        got = block.feed_forward_chunk(x)
        norm = block.output.LayerNorm
        mixture = reference_ffn(family, layer, x, out_layer)
        expected = F.layer_norm(
            mixture + x.reshape(-1, D).double(), (D,), norm.weight.double(), norm.bias.double(), norm.eps
        )
    else:
        got = layer(x)
        expected = reference_ffn(family, layer, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got.reshape(-1, D).double(), expected, rtol=0, atol=1e-5)
    # the routes are varied: the check covers several experts and mixed pairs
    routes = reference_route(x.reshape(-1, D).double(), layer.mixlora_router["default"].double(), K)
    assert len({e for experts, _ in routes for e in experts}) >= 3


def test_attention_lora_matches_reference():
    model = trained(mixlora("llama"))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    x = hidden_rows()
    A, B, W = q.mixlora_A["default"].double(), q.mixlora_B["default"].double(), q.base_layer.weight.double()
    expected = x.double() @ W.T + (ALPHA / R) * (x.double() @ A.T) @ B.T
    torch.testing.assert_close(q(x).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "t5", "t5_gated", "bert"])
def test_untrained_adapter_and_disabled_adapter_reproduce_the_base_model(family):
    batch = tiny_batch("t5" if family == "t5_gated" else family)
    base_out = main_output(BUILDERS[family](), batch)
    model = mixlora(family)
    # B = 0 at init and the weights of a row sum to one: the mixture of identical FFNs is the FFN
    torch.testing.assert_close(main_output(model, batch), base_out, rtol=1e-5, atol=1e-5)
    trained(model)
    assert (main_output(model, batch) - base_out).abs().max() > 1e-3
    # PeftModelForSeq2SeqLM's own call path differs from the bare T5's by ~1e-6 (stock LoRA's too)
    exact = 0 if family in ("llama", "bert") else 1e-5
    with model.disable_adapter():
        torch.testing.assert_close(main_output(model, batch), base_out, rtol=0, atol=exact)


# -- routing ----------------------------------------------------------------------------------------------------
def plant_router(layer, column: list[float]) -> None:
    """Router reading only feature 0: logits = column * x[0]."""
    with torch.no_grad():
        router = layer.mixlora_router["default"]
        router.zero_()
        router[:, 0] = torch.tensor(column)


def count_expert_calls(layer) -> list[tuple[str, int, int]]:
    """Record (linear, expert, rows) of every expert LoRA the layer runs."""
    calls, run = [], layer._expert_lora

    def counting(adapter_name, name, expert, u):
        calls.append((name, expert, u.shape[0]))
        return run(adapter_name, name, expert, u)

    layer._expert_lora = counting
    return calls


def test_only_routed_experts_run_on_their_tokens():
    model = trained(mixlora("llama"))
    layer = ffn_layers(model)[0]
    plant_router(layer, [5.0, 4.0, -4.0, -5.0])  # x[0] = +1 -> experts {0, 1}; x[0] = -1 -> {3, 2}
    x = hidden_rows() * 0.01
    x[0, :, 0], x[1, :3, 0], x[1, 3:, 0] = 1.0, 1.0, -1.0  # 8 tokens to {0, 1}, 2 tokens to {2, 3}
    calls = count_expert_calls(layer)
    layer(x)
    linears = ("gate_proj", "up_proj", "down_proj")
    expected = [(n, e, 8) for e in (0, 1) for n in linears] + [(n, e, 2) for e in (2, 3) for n in linears]
    assert sorted(calls) == sorted(expected)

    calls.clear()
    x[..., 0] = 1.0  # every token to {0, 1}: experts 2 and 3 never run
    layer(x)
    assert sorted({e for _, e, _ in calls}) == [0, 1]
    assert all(rows == 10 for _, _, rows in calls)


def test_router_receives_gradient_from_the_task_loss():
    model = trained(mixlora("llama", router_aux_loss_coef=0.0))
    batch = tiny_batch("llama")
    model(**batch).loss.backward()
    for layer in ffn_layers(model):
        assert layer.mixlora_router["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
def test_backward_reaches_every_trainable_tensor(family):
    model = trained(mixlora(family)).train()
    loss = training_loss(model, tiny_batch(family)) + pyramid_peft.aux_loss(model)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mixlora_" in n for n in trainable)
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    # an expert's factors learn exactly when the router sent it at least one token
    routed_by_handoff = {}
    for layer in ffn_layers(model):
        routed = (layer._aux_state["weights"] != 0).any(dim=0)
        routed_by_handoff[id(layer.handoff)] = routed
        assert bool((layer.mixlora_router["default"].grad.abs().sum(-1) > 0).all())  # softmax: every row learns
        check_expert_grads(layer, routed)
    for layer in model.modules():
        if isinstance(layer, ExpertOutput):
            check_expert_grads(layer, routed_by_handoff[id(layer.handoff)])


def check_expert_grads(layer, routed: torch.Tensor) -> None:
    for container in (layer.mixlora_expert_A, layer.mixlora_expert_B):
        for param in container["default"].values():
            has_grad = param.grad.reshape(E, -1).abs().sum(-1) > 0
            assert torch.equal(has_grad, routed)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_keeps_bert_split_ffn_exact(use_reentrant):
    """BERT's FFN halves hand the route over in state; recomputation in backward must rebuild it."""
    batch = tiny_batch("bert")
    grads = []
    for checkpointing in (False, True):
        model = trained(mixlora("bert")).train()  # same seeds, so the same dropout masks in both runs
        if checkpointing:
            kwargs = {"use_reentrant": use_reentrant}
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        training_loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


# -- balance loss ---------------------------------------------------------------------------------------------
def test_balance_loss_planted_routing_and_uniform():
    model = mixlora("llama")
    layer = ffn_layers(model)[0]
    with torch.no_grad():
        router = layer.mixlora_router["default"]
        router.zero_()
        router[:, 0] = torch.tensor([2.0, 1.0, 0.0, 0.0])  # token e_0: logits [2, 1, 0, 0] -> experts {0, 1}
        router[:, 1] = torch.tensor([2.0, 0.0, 1.0, 0.0])  # token e_1: logits [2, 0, 1, 0] -> experts {0, 2}
    layer(torch.eye(D)[:2].reshape(1, 2, D))
    # f = (2/4, 1/4, 1/4, 0); P = mean of the two softmaxes; E * sum_i f_i P_i = (2e^2 + e + 1) / (e^2 + e + 2)
    e = math.e
    expected = (2 * e**2 + e + 1) / (e**2 + e + 2)
    assert layer.aux_terms("default")["balance"].item() == pytest.approx(expected, rel=1e-6)

    with torch.no_grad():
        layer.mixlora_router["default"].zero_()
    layer(hidden_rows())
    assert layer.aux_terms("default")["balance"].item() == pytest.approx(1.0, rel=1e-6)


def test_balance_loss_leaves_padding_out():
    model = trained(mixlora("llama"))
    batch = tiny_batch("llama")
    batch["attention_mask"][0, 5:] = 0  # right padding in the first row
    layers = ffn_layers(model)
    rows = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, i=i: rows.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(layers)
    ]
    model(**batch)
    for hook in hooks:
        hook.remove()
    real = batch["attention_mask"].reshape(-1).bool()
    for i, layer in enumerate(layers):
        x = rows[i].reshape(-1, rows[i].shape[-1])[real]
        logits = layer.router_logits("default", x)
        expected = switch_balance_loss(logits, topk_softmax(logits, layer.mixlora_config["default"].top_k))
        torch.testing.assert_close(layer.aux_terms("default")["balance"], expected)


def test_aux_loss_is_the_weighted_mean_over_ffn_blocks():
    model = trained(mixlora("t5", router_aux_loss_coef=0.01))
    model(**tiny_batch("t5"))
    per_block = [layer.aux_terms("default")["balance"] for layer in ffn_layers(model)]
    assert len(per_block) == 4  # 2 encoder + 2 decoder FFN blocks
    expected = 0.01 * torch.stack(per_block).mean()
    torch.testing.assert_close(pyramid_peft.aux_loss(model), expected)
    assert set(pyramid_peft.aux_loss(model, breakdown=True)) == {"balance"}


def test_jitter_noise_perturbs_the_router_input_in_training_only():
    model = trained(mixlora("llama", jitter_noise=0.5))
    layer = ffn_layers(model)[0]
    x = hidden_rows()
    clean = layer.router_logits("default", x)
    torch.testing.assert_close(clean, x @ layer.mixlora_router["default"].T)
    layer.train()
    noisy = layer.router_logits("default", x)
    assert not torch.allclose(noisy, clean)


# -- task ids, generation, save/reload ------------------------------------------------------------------------
def test_task_ids_are_accepted_and_ignored():
    model = trained(mixlora("t5"))
    batch = tiny_batch("t5")
    plain = main_output(model, batch)
    torch.testing.assert_close(main_output(model, batch, task_ids=torch.tensor([0, 2, 1, 0])), plain, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generate_with_beams(family):
    model = trained(mixlora(family))
    out = generate_with_beams(model, family, task_ids=torch.tensor([0, 1, 2, 0]))
    assert out.shape[0] == 4
    again = generate_with_beams(model, family, task_ids=torch.tensor([2, 2, 2, 2]))
    assert torch.equal(out, again)  # routing is per token, never per task


# -- merging, accounting, configuration -----------------------------------------------------------------------
def test_not_mergeable(tmp_path):
    model = trained(mixlora("llama"))
    attempts = (lambda: merge_for_task(model, 0), lambda: export_lora(model, 0, tmp_path / "x"), model.merge_and_unload)
    for attempt in attempts:
        with pytest.raises(NotMergeableError, match="MixLoRA cannot be merged.*routes every token"):
            attempt()
    assert not (tmp_path / "x").exists()


def test_unload_returns_the_base_model():
    batch = tiny_batch("bert")
    base_out = main_output(BUILDERS["bert"](), batch)
    unloaded = trained(mixlora("bert")).unload()
    assert not any("mixlora" in n for n, _ in unloaded.named_parameters())
    torch.testing.assert_close(main_output(unloaded, batch), base_out, rtol=0, atol=0)


def lora(d_in: int, d_out: int) -> int:
    return R * (d_in + d_out)  # LoRA's r (d_in + d_out)


@pytest.mark.parametrize(
    "family, ffn_linears, blocks, attention",
    [
        # LLaMA: gate/up (32 -> 64), down (64 -> 32); q, o 32 -> 32 and k, v 32 -> 16 (2 KV heads) per layer
        ("llama", [(D, D_FF), (D, D_FF), (D_FF, D)], 2, 2 * [(D, D), (D, 16), (D, 16), (D, D)]),
        # T5: wi, wo in 2 encoder + 2 decoder blocks; q, k, v, o in encoder self, decoder self and cross attention
        ("t5", [(D, D_FF), (D_FF, D)], 4, (2 * 4 + 2 * 8) * [(D, D)]),
        ("t5_gated", [(D, D_FF), (D, D_FF), (D_FF, D)], 4, (2 * 4 + 2 * 8) * [(D, D)]),
        # BERT: intermediate.dense, output.dense; query, key, value, attention.output.dense
        ("bert", [(D, D_FF), (D_FF, D)], 2, 2 * 4 * [(D, D)]),
    ],
)
def test_parameter_count(family, ffn_linears, blocks, attention):
    counts = count_parameters(mixlora(family))
    adapter = blocks * E * sum(lora(*shape) for shape in ffn_linears) + sum(lora(*shape) for shape in attention)
    assert counts["adapter"] == adapter
    assert counts["router"] == blocks * E * D
    assert counts["task_embedding"] == 0
    expected = {  # the same formula as numbers: (E * FFN LoRA + attention LoRA, router)
        "llama": (9216 + 1792, 256),
        "t5": (12288 + 6144, 512),
        "t5_gated": (18432 + 6144, 512),
        "bert": (6144 + 2048, 256),
    }
    assert (counts["adapter"], counts["router"]) == expected[family]


def test_config_defaults_registry_and_validation():
    config = MixLoraConfig()
    assert config.peft_type == "MIXLORA"
    assert (config.num_experts, config.top_k, config.router_init_range, config.jitter_noise) == (8, 2, 0.02, 0.0)
    assert config.aux_loss_weights() == {"balance": 0.001}
    assert (config.capabilities().routing, config.capabilities().merging) == (Routing.TOKEN, Merging.NONE)
    assert "mixlora" in method_names() and isinstance(make_peft_config("mixlora", r=4), MixLoraConfig)
    bad_settings = (
        dict(top_k=0),
        dict(top_k=9),
        dict(num_experts=0),
        dict(jitter_noise=1.0),
        dict(router_aux_loss_coef=-1),
    )
    for bad in bad_settings:
        with pytest.raises(ValueError):
            MixLoraConfig(**bad)


def test_defaults_fill_the_modules_per_architecture():
    model = mixlora("bert")
    config = model.peft_config["default"]
    assert config.ffn_modules == {"intermediate"}
    assert config.target_modules == {"query", "key", "value", "attention.output.dense"}
    router = ffn_layers(model)[0].mixlora_router["default"]
    assert router.shape == (E, D) and 0.01 < router.std().item() < 0.03  # N(0, 0.02^2)


def test_bad_targets_fail_clearly():
    with pytest.raises(ValueError, match="inside a MixLoRA FFN"):
        mixlora("t5", target_modules=["q", "v", "wi"])
    with pytest.raises(TypeError, match="not an FFN layout"):
        mixlora("llama", ffn_modules=["self_attn"])
    with pytest.raises(ValueError, match="matched no module"):
        mixlora("llama", ffn_modules=["feed_forward"])
