"""TuckA: float64 parity with the spec's formulas, one route shared by every layer of a forward, data-aware
centroids initialised exactly once (and kept on reload), routing gradients, loss-free balancing, per-example
routing, merging a fixed route, gradient checkpointing, save/reload, beams and counts."""

import pytest
import torch
from _models import (
    T5_BASE_TARGETS,
    adapted_shapes,
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
from conftest import TINY_BUILDERS, tiny_batch
from pyramid_peft import (
    Capabilities,
    Merging,
    Routing,
    count_parameters,
    export_lora,
    make_peft_config,
    merge_tucka_route,
)
from pyramid_peft.methods.tucka import (
    TuckaConfig,
    TuckaLayer,
    TuckaRoutingError,
    fixed_route,
)

R, K, T, P, ALPHA = 4, 2, 3, 2, 0.7
IDS = torch.tensor([2, 0, 1, 0])


def settings(**overrides) -> dict:
    values = dict(r=R, k=K, t=T, p=P, alpha=ALPHA, ec_perturb_scale=0.5)
    values.update(overrides)
    return values


def tiny(family, **overrides):
    return peft_tiny(family, TuckaConfig(**settings(**overrides)))


def trained(model, seed: int = 0):
    """Groups that differ (they start identical) and a first forward that initialises the centroids."""
    perturb(model, scale=0.3, seed=seed)
    return model


def layers(model) -> list[TuckaLayer]:
    return [layer for _, layer in model.base_model.routed_layers()]


def owner(model) -> TuckaLayer:
    return model.base_model.shared_route.owners["default"]


class TwoLinears(nn.Module):
    """x -> second(relu(first(x))): a model small enough to write TuckA out by hand."""

    def __init__(self, d_in=6, hidden=8, d_out=5, swap=False):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(d_in, hidden)
        self.second = nn.Linear(hidden, d_out)
        self.swap = swap  # run `second` first (both square then): forward order differs from registration order

    def forward(self, x, attention_mask=None):
        if self.swap:
            return self.first(torch.relu(self.second(x)))
        return self.second(torch.relu(self.first(x)))


def two_linears(swap=False, **overrides):
    base = TwoLinears(8, 8, 8, swap=True) if swap else TwoLinears()
    model = get_peft_model(base, TuckaConfig(target_modules=["first", "second"], **settings(**overrides)))
    perturb(model, scale=0.3)
    return model.eval()


# -- the independent float64 reference ------------------------------------------------------------------------
def reference_tucka(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spec §3.1 written out: route from the first layer's masked mean input, then y = W0 (x + a x Û M̄ Ûᵀ) + b."""
    first, second = (layer for layer in layers(model))
    E = first.tucka_centroids["default"]
    m = mask.double()[..., None]
    x_bar = (x * m).sum((0, 1)) / m.sum()
    z = (E @ x_bar).reshape(K, T)
    sigma = torch.sigmoid(z / z.norm(dim=1, keepdim=True))
    g = int(sigma.reshape(-1).argmax()) // T
    w = sigma[g]

    def adapted(layer, h):
        G = layer.tucka_core["default"][g]
        G = G / torch.sqrt((G**2).sum())
        C = layer.tucka_mode["default"]
        C = C / torch.sqrt((C**2).sum())
        U = layer.tucka_factor["default"]
        U = U / torch.sqrt((U**2).sum())
        M = sum(w[j] * sum(C[j, q] * G[q] for q in range(P)) for j in range(T))
        h = h + ALPHA * h @ U @ M @ U.T
        return h @ layer.base_layer.weight.T + layer.base_layer.bias

    return adapted(second, torch.relu(adapted(first, x))), g, w


def test_forward_equals_float64_reference():
    model = two_linears().double()
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    model(x=x, attention_mask=mask)  # data-aware init
    with torch.no_grad():  # centroids far from each other, so the pick is not a near-tie
        owner(model).tucka_centroids["default"].normal_()
    expected, g, w = reference_tucka(model, x, mask)
    torch.testing.assert_close(model(x=x, attention_mask=mask), expected, rtol=0, atol=1e-12)
    group, weights = model.base_model.last_route()
    assert int(group) == g
    torch.testing.assert_close(weights, w, rtol=0, atol=1e-15)


# -- one route per forward, shared by every layer -------------------------------------------------------------
def test_every_layer_sees_the_same_route(monkeypatch):
    model = trained(tiny("t5"))
    seen = []
    original = TuckaLayer.adapter_route

    def recording(self, adapter_name, x):
        group, weights = original(self, adapter_name, x)
        seen.append((self.module_key, int(group), weights.detach().clone()))
        return group, weights

    monkeypatch.setattr(TuckaLayer, "adapter_route", recording)
    main_output(model, tiny_batch("t5"))
    group, weights = model.base_model.last_route()
    assert len(seen) == len(layers(model)) == 2 * 6 + 2 * 10  # encoder q k v o wi wo; decoder + cross attention
    assert seen[0][0] == "encoder.block.0.layer.0.SelfAttention.q"  # the router: first adapted module to run
    for _, g, w in seen:
        assert g == int(group)
        torch.testing.assert_close(w, weights, rtol=0, atol=0)


def test_default_router_is_the_first_module_in_forward_order():
    model = two_linears(swap=True)  # `second` runs first; the centroids live on `first` (registered first)
    assert owner(model).module_key == "first"
    model(x=torch.randn(2, 4, 8))
    assert model.base_model.shared_route.routes["default"].source.module_key == "second"


def test_router_module_override_and_errors():
    name = "encoder.block.0.layer.1.DenseReluDense.wi"
    model = tiny("t5", router_module=name)
    assert owner(model).module_key == name and owner(model).tucka_centroids["default"].shape == (K * T, 32)
    # encoder attention runs before the chosen router: there is no route to read yet, and the error says so
    with pytest.raises(TuckaRoutingError, match="router_module"):
        main_output(model, tiny_batch("t5"))
    with pytest.raises(ValueError, match="Did you mean"):
        tiny("t5", router_module="encoder.block.0.layer.0.SelfAttention.qq")


# -- data-aware centroids -------------------------------------------------------------------------------------
def test_centroids_initialised_once_from_the_masked_mean_and_kept_on_reload(tmp_path):
    model = tiny("t5", ec_perturb_scale=0.25)
    router = owner(model)
    captured = []
    hook = router.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    batch = tiny_batch("t5")
    main_output(model, batch)
    hook.remove()
    x, mask = captured[0], batch["attention_mask"].float()[..., None]
    x_bar = (x * mask).sum((0, 1)) / mask.sum()  # padding excluded
    E = router.tucka_centroids["default"].detach().clone()
    torch.testing.assert_close(E[0], x_bar, rtol=0, atol=1e-6)
    noise = E[1:] - x_bar
    assert noise.abs().max() <= 0.25 and noise.abs().max() > 0.2 and bool(router.tucka_centroids_ready["default"])
    main_output(model, tiny_batch("t5", seed=5))  # another batch: no re-initialisation
    assert torch.equal(router.tucka_centroids["default"], E)
    # trained centroids survive save -> reload -> forward
    with torch.no_grad():
        router.tucka_centroids["default"].add_(1.0)
    trained_E = router.tucka_centroids["default"].detach().clone()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(TINY_BUILDERS["t5"](), tmp_path).eval()
    main_output(reloaded, batch)
    assert torch.equal(owner(reloaded).tucka_centroids["default"], trained_E)


def test_kaiming_centroids_are_never_overwritten():
    model = tiny("llama", centroid_init="kaiming")
    E = owner(model).tucka_centroids["default"].detach().clone()
    assert E.abs().sum() > 0
    main_output(model, tiny_batch("llama"))
    assert torch.equal(owner(model).tucka_centroids["default"], E)


def test_routing_gradient_reaches_the_centroids():
    model = trained(tiny("t5"))
    main_output(model, tiny_batch("t5"))  # initialise, then perturb so the route is not a near-tie
    perturb(model, scale=0.3, seed=1)
    model(**tiny_batch("t5")).loss.backward()
    assert owner(model).tucka_centroids["default"].grad.abs().sum() > 0


# -- auxiliary-loss-free balancing ----------------------------------------------------------------------------
def picks_over(model, x, steps):
    picks = []
    for _ in range(steps):
        model(x=x)
        picks.append(int(model.base_model.shared_route.routes["default"].expert))
    return picks


def test_alb_bias_step_and_balance():
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))
    plain = two_linears().train()
    assert len(set(picks_over(plain, x, 30))) == 1  # without balancing one expert takes every batch
    model = two_linears(balance="alb", alb_gamma=0.05)
    bias = owner(model).tucka_alb_bias["default"]
    model(x=x)  # eval: the bias does not move
    assert torch.equal(bias, torch.zeros(K * T))
    model.train()
    model(x=x)
    first = int(model.base_model.shared_route.routes["default"].expert)
    expected = torch.full((K * T,), 0.05)
    expected[first] = -0.05  # b_i += gamma * sign(mean load - load_i): the picked expert goes down
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)
    loads = torch.bincount(torch.tensor(picks_over(model, x, 60)), minlength=K * T)
    assert bool((loads > 0).all()) and int(loads.max() - loads.min()) <= 60 // (K * T)


# -- per-example routing --------------------------------------------------------------------------------------
def test_example_routing_equals_batch_routing_of_each_example():
    model = two_linears(routing="example")
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0)) * 0.1
    x[0, :, 0] += 3.0  # example 0 points along e_0, example 1 against it
    x[1, :, 0] -= 3.0
    model(x=x)  # initialise
    with torch.no_grad():  # group 0 holds +e_0, group 1 holds -e_0: each example's best expert is in another group
        eye = torch.eye(6)
        owner(model).tucka_centroids["default"].copy_(torch.stack([eye[0], eye[1], eye[2], -eye[0], eye[3], eye[4]]))
    together = model(x=x)
    groups, weights = model.base_model.last_route()
    assert groups.shape == (2,) and weights.shape == (2, T) and groups[0] != groups[1]
    model.peft_config["default"].routing = "batch"
    for row in range(2):
        torch.testing.assert_close(together[row : row + 1], model(x=x[row : row + 1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,routing", [("t5", "example"), ("llama", "batch"), ("llama", "example")])
def test_generate_with_beams(family, routing):
    model = trained(tiny(family, routing=routing))
    out = generate_with_beams(model, family, task_ids=IDS)  # ids are accepted and ignored
    assert out.shape[0] == 4


def test_task_ids_are_accepted_and_ignored():
    model = trained(tiny("t5"))
    batch = tiny_batch("t5")
    without = main_output(model, batch)
    torch.testing.assert_close(main_output(model, batch, task_ids=IDS), without, rtol=0, atol=0)


# -- merging one fixed route ----------------------------------------------------------------------------------
def test_merge_of_a_fixed_route_equals_the_routed_output(tmp_path, family):
    model = trained(tiny(family))
    batch = tiny_batch(family)
    routed = main_output(model, batch)
    group, weights = model.base_model.last_route()
    merged = merge_tucka_route(model, int(group), weights)
    torch.testing.assert_close(main_output(merged, batch), routed, rtol=0, atol=1e-5)
    with fixed_route(model, int(group), weights):
        export_lora(model, 0, tmp_path)
    exported = PeftModel.from_pretrained(TINY_BUILDERS[family](), tmp_path).eval()
    torch.testing.assert_close(main_output(exported, batch), routed, rtol=0, atol=1e-5)


# -- the common contract --------------------------------------------------------------------------------------
def test_backward_reaches_every_trainable_tensor(family):
    model = trained(tiny(family))
    main_output(model, tiny_batch(family))
    perturb(model, scale=0.3, seed=1)
    training_loss(model.train(), tiny_batch(family)).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".tucka_" in n for n in trainable)
    assert sum("tucka_centroids" in n for n in trainable) == 1
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    """The route is state: recomputation in backward reuses it (and rebuilds the router's own graph)."""
    batch = tiny_batch("llama")
    grads = []
    for checkpointing in (False, True):
        model = trained(tiny("llama")).train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert any("tucka_centroids" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


# -- accounting -----------------------------------------------------------------------------------------------
def test_parameter_count_matches_formula(family):
    model = tiny(family)
    counts = count_parameters(model)
    # arXiv 2511.06859: k p r^2 + t p + d_in r per layer, plus k t d_in once for the centroids
    assert counts["adapter"] == sum(K * P * R * R + T * P + d_in * R for d_in, _ in adapted_shapes(model))
    assert counts["router"] == K * T * 32 and counts["task_embedding"] == 0
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_t5_base_count_with_the_glue_settings():
    config = TuckaConfig(target_modules=T5_BASE_TARGETS, r=8, k=2, t=2, p=2, alpha=2)
    counts = count_parameters(get_peft_model(t5_base_skeleton(), config))
    per_768_layer = 2 * 2 * 64 + 2 * 2 + 768 * 8
    assert per_768_layer == 6_404  # docs/methods.md
    assert counts["modules"] == 192
    assert counts["adapter"] == 168 * per_768_layer + 24 * (256 + 4 + 3072 * 8)  # 24 wo layers read 3072
    assert counts["router"] == 2 * 2 * 768


# -- configuration --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"r": 0}, "r=0"),
        ({"k": 0}, "k=0"),
        ({"routing": "token"}, "routing"),
        ({"balance": "aux"}, "balance"),
        ({"centroid_init": "zeros"}, "centroid_init"),
        ({"alb_gamma": 0}, "alb_gamma"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TuckaConfig(target_modules=["q"], **overrides)


def test_registered_by_name():
    config = make_peft_config("tucka", target_modules=["q"])
    assert isinstance(config, TuckaConfig) and config.peft_type == "TUCKA"
    assert config.capabilities() == Capabilities(Routing.BATCH, Merging.NONE, config.capabilities().reason)
    assert (config.r, config.k, config.t, config.p, config.alpha) == (8, 3, 3, 2, 1.0)
    # routed by its input: the trainer need not pass task ids (the model accepts and ignores them)
    assert not pyramid_peft.adapter_reads_task_ids(
        get_peft_model(TwoLinears(), TuckaConfig(target_modules=["first"], r=4))
    )
