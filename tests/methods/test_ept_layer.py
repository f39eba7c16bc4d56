"""EPT layer: float64 parity with an independent dense reference, init, gradients, routing, golden tensors."""

import contextlib
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import shared_dir
from pyramid_peft import EptConfig, TaskRoutingError
from pyramid_peft.methods.ept import experts
from pyramid_peft.methods.ept import layer as ept_layer
from pyramid_peft.methods.ept.layer import Linear
from pyramid_peft.routing import TaskRoute

pytestmark = pytest.mark.usefixtures("float64_default")  # float64 identities (conftest)

KERNELS = [2, 2, 4, 4, 6, 6, 8, 8]
PAPER_INIT = dict(factor_init="gaussian", kernel_init="zeros", dim_scale="rank_sq")  # the paper form's start


def make_layer(d_in=24, d_out=32, seed=0, randomize=True, **overrides):
    torch.manual_seed(seed)
    settings = dict(num_tasks=3, r=4, lora_alpha=8, lora_dropout=0.0, kernel_sizes=KERNELS, top_k=2)
    settings.update(overrides)
    config = EptConfig(target_modules=["x"], **settings)
    layer = Linear(nn.Linear(d_in, d_out), "default", config, route=TaskRoute(config.num_tasks, "EPT"))
    if randomize:  # non-zero factors and kernels so every path is exercised
        with torch.no_grad():
            layer.ept_B["default"].normal_()
            layer.ept_kernels["default"].normal_()
            layer.ept_gate["default"].bias.normal_()
            layer.ept_task_embedding["default"].normal_()
    return layer.double()


def dense_kron(S, K):
    m, n = S.shape
    k = K.shape[0]
    return (S[:, None, :, None] * K[None, :, None, :]).reshape(m * k, n * k)


def reference_delta(layer, task, d_out, d_in):
    """(alpha/r) sum_e g_e ΔW_e from the layer's raw tensors, computed independently of its helpers."""
    config = layer.ept_config["default"]
    A, B = layer.ept_A["default"], layer.ept_B["default"]
    flat = layer.ept_kernels["default"]
    rank = torch.arange(1, config.r + 1) / config.r if config.dim_scale == "rank_sq" else torch.ones(config.r)
    A, B = A * rank[:, None], B * rank[None, :]
    gate = layer.ept_gate["default"]
    logits = gate.weight @ layer.ept_task_embedding["default"][task] + gate.bias
    if config.gate_form == "code":
        probs = torch.softmax(logits, -1)
        top = probs.topk(config.top_k)
        weights = dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))
    else:
        top = logits.topk(config.top_k)
        weights = dict(zip(top.indices.tolist(), torch.softmax(top.values / config.router_tau, -1).tolist()))
    delta = torch.zeros(d_out, d_in)
    offset = 0
    for e, k in enumerate(config.kernel_sizes):
        if config.expert_form == "kron2d":
            m, n = math.ceil(d_out / k), math.ceil(d_in / k)
            K = flat[offset : offset + k * k].view(k, k)
            offset += k * k
            dW = dense_kron(B[:m] @ A[:, :n], K)[:d_out, :d_in]
        else:
            m, n = d_out // k, d_in // k
            K = flat[offset : offset + m * k].view(m, k)
            offset += m * k
            S = B[:m] @ A[:, :n]
            dW = torch.zeros(d_out, d_in)
            dW[: m * k, :n] = (K[:, :, None] * S[:, None, :]).reshape(m * k, n)
        if e in weights:
            delta += weights[e] * dW
    return config.lora_alpha / config.r * delta


@pytest.mark.parametrize(
    "d_in,d_out,overrides",
    [
        (24, 32, {}),
        (26, 30, {}),  # not divisible by 4, 6, 8: ceil + crop
        (24, 32, {"expert_form": "code1d"}),
        (26, 35, {"expert_form": "code1d"}),  # floor + pad
        (24, 32, {"gate_form": "code", "dim_scale": "none"}),
        (24, 32, {"router_tau": 0.5, "top_k": 3}),
        (24, 32, {"top_k": 8}),  # dense routing
    ],
)
def test_factored_forward_equals_dense_reference(d_in, d_out, overrides):
    layer = make_layer(d_in, d_out, **overrides)
    x = torch.randn(3, 5, d_in)
    for task in range(3):
        with layer.route.call(torch.full((3,), task)):
            out = layer(x)
        expected = layer.base_layer(x) + x @ reference_delta(layer, task, d_out, d_in).T
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("overrides", [{}, {"expert_form": "code1d"}, {"dim_scale": "coord_lin"}, {"alp": False}])
def test_factored_forward_equals_literal_transposed_convolutions(overrides):
    """The reshape identity against experts built literally with transposed convolutions (materialize=True)."""
    factored = make_layer(26, 30, **overrides)
    literal = make_layer(26, 30, materialize=True, **overrides)
    x = torch.randn(2, 4, 26)
    for task in range(3):
        ids = torch.full((2,), task)
        with factored.route.call(ids), literal.route.call(ids):
            torch.testing.assert_close(factored(x), literal(x), rtol=0, atol=1e-10)


def test_mixed_task_batch_equals_per_task_batches():
    layer = make_layer()
    x = torch.randn(5, 4, 24)
    ids = torch.tensor([2, 0, 1, 0, 2])
    with layer.route.call(ids):
        mixed = layer(x)
    for i, task in enumerate(ids.tolist()):
        with layer.route.call(torch.tensor([task])):
            torch.testing.assert_close(mixed[i : i + 1], layer(x[i : i + 1]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["kron2d", "code1d"])
def test_mixed_batch_matches_for_code1d_and_token_routing(form):
    layer = make_layer(expert_form=form, router_input="token")
    x = torch.randn(2, 3, 24)
    out = layer(x)  # token routing needs no task ids
    for b in range(2):
        for t in range(3):
            single = layer(x[b : b + 1, t : t + 1])
            torch.testing.assert_close(out[b, t], single[0, 0], rtol=0, atol=1e-10)


def test_paper_mode_is_the_base_model_at_init_and_kernels_learn_first():
    layer = make_layer(randomize=False, **PAPER_INIT)
    x = torch.randn(2, 3, 24)
    with layer.route.call(torch.tensor([0, 1])):
        out = layer(x)
    torch.testing.assert_close(out, layer.base_layer(x), rtol=0, atol=0)
    out.pow(2).sum().backward()
    assert layer.ept_kernels["default"].grad.abs().sum() > 0
    assert layer.ept_A["default"].grad.abs().sum() == 0  # S only learns once K != 0


def test_default_init_is_the_base_model_at_init_and_its_factor_b_learns_at_once():
    """The defaults start as LoRA does (B = 0) with unit-variance kernels: B gets a gradient at step 0."""
    layer = make_layer(d_in=48, d_out=64, randomize=False)
    x = torch.randn(2, 3, 48)
    with layer.route.call(torch.tensor([0, 1])):
        out = layer(x)
    torch.testing.assert_close(out, layer.base_layer(x), rtol=0, atol=0)
    out.pow(2).sum().backward()
    assert layer.ept_B["default"].grad.abs().sum() > 0
    kernels = layer.ept_kernels["default"]
    assert kernels.abs().max() <= math.sqrt(3) and abs(kernels.var().item() - 1) < 0.25  # U(-√3, √3): variance 1


def test_initialisation_scales():
    layer = make_layer(d_in=768, d_out=768, r=8, randomize=False, **PAPER_INIT)
    assert layer.ept_A["default"].shape == (8, 384) and layer.ept_B["default"].shape == (384, 8)
    assert abs(layer.ept_A["default"].std().item() - 1 / 8) < 0.01
    assert layer.ept_kernels["default"].abs().sum() == 0
    emb = layer.ept_task_embedding["default"]
    assert abs(emb.std().item() - 0.01) < 0.002
    code = make_layer(d_in=768, d_out=768, r=8, randomize=False, expert_form="code1d", factor_init="kaiming")
    bound = 1 / math.sqrt(384)
    assert code.ept_A["default"].abs().max() <= bound and code.ept_A["default"].abs().max() > 0.9 * bound
    assert code.ept_kernels["default"].abs().sum() > 0


def test_standard_factor_init_zeroes_one_factor():
    layer = make_layer(randomize=False, factor_init="standard")
    assert layer.ept_B["default"].abs().sum() == 0 and layer.ept_kernels["default"].abs().sum() > 0


def test_contrastive_loss_matches_hand_computation():
    layer = make_layer()
    x = torch.randn(3, 4, 24)
    ids = torch.tensor([0, 2, 1])
    with layer.route.call(ids):
        layer(x)
    loss = layer.aux_terms("default")["contrastive"]
    table = layer.ept_task_embedding["default"]
    h = x[:, 0]
    sims = (h @ table.T) / (h.norm(dim=1)[:, None] * table.norm(dim=1)[None, :]) / 0.05
    expected = -(sims.log_softmax(dim=1)[torch.arange(3), ids]).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)


def test_task_ids_are_required_and_checked():
    layer = make_layer()
    x = torch.randn(2, 3, 24)
    with pytest.raises(TaskRoutingError, match="task_ids"):
        layer(x)
    with pytest.raises(TaskRoutingError, match=r"outside \[0, 3\)"), layer.route.call(torch.tensor([0, 3])):
        layer(x)
    with pytest.raises(TaskRoutingError, match="one task id per example"), layer.route.call(torch.tensor([0, 1, 2])):
        layer(x)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"kernel_sizes": [2, 0, 4]}, "positive integers"),
        ({"kernel_sizes": []}, "empty"),
        ({"top_k": 9}, "top_k=9"),
        ({"expert_form": "kron"}, "Did you mean 'kron2d'"),
        ({"factor_init": "standard", "kernel_init": "zeros"}, "zero gradient"),
        ({"num_tasks": 0}, "num_tasks"),
        ({"r": 0}, "r=0"),
    ],
)
def test_config_errors_name_the_problem(overrides, message):
    settings = dict(target_modules=["q"])
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        EptConfig(**settings)


def test_rank_larger_than_the_seed_is_rejected():
    with pytest.raises(ValueError, match="do not fit"):
        make_layer(d_in=8, d_out=8, r=16, kernel_sizes=[2, 4])


def test_golden_tensors_of_the_public_reference_layer():
    """code1d + the reference gate reproduce the public EPT layer's outputs and contrastive losses (float64)."""
    path = shared_dir() / "spec" / "golden" / "ept_code1d_96x192.safetensors"
    if not path.exists():
        pytest.skip(f"golden tensors not found at {path}")
    golden = load_file(str(path))
    config = EptConfig.reference_code(
        target_modules=["q"], num_tasks=8, r=4, lora_alpha=8, lora_dropout=0.0, kernel_sizes=KERNELS, top_k=2
    )
    layer = Linear(nn.Linear(96, 192), "default", config, route=TaskRoute(8, "EPT")).double()
    with torch.no_grad():
        layer.base_layer.weight.copy_(golden["base_layer.weight"])
        layer.base_layer.bias.copy_(golden["base_layer.bias"])
        layer.ept_A["default"].copy_(golden["lora_A.default.weight"])
        layer.ept_B["default"].copy_(golden["lora_B.default.weight"])
        kernels = [golden[f"lora_expert_kernels.default.{e}"][0, :, :, 0].reshape(-1) for e in range(8)]
        layer.ept_kernels["default"].copy_(torch.cat(kernels))
        layer.ept_gate["default"].weight.copy_(golden["lora_gate.default.0.weight"])
        layer.ept_gate["default"].bias.copy_(golden["lora_gate.default.0.bias"])
        layer.ept_task_embedding["default"].copy_(golden["lora_task_embedding.default.weight"])
    x = golden["x"]
    for task in range(8):
        with layer.route.call(torch.full((x.shape[0],), task)):
            out = layer(x)
        torch.testing.assert_close(out, golden[f"y_task{task}"], rtol=0, atol=1e-12)
        loss = layer.aux_terms("default")["contrastive"]
        torch.testing.assert_close(loss, golden[f"cl_loss_task{task}"].reshape(()), rtol=0, atol=1e-12)


def test_inference_reuses_factors_until_parameters_or_route_change():
    layer = make_layer()
    x = torch.randn(2, 3, 24)
    ids = torch.tensor([1, 1])
    with torch.no_grad(), layer.route.call(ids):
        first = layer(x)
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
        layer.ept_kernels["default"].mul_(2.0)  # an in-place update (as an optimizer step) must invalidate it
        changed = layer(x)
    assert not torch.allclose(changed, first)
    with layer.route.call(ids):
        torch.testing.assert_close(layer(x), changed, rtol=0, atol=1e-12)  # the grad path agrees
    with torch.no_grad(), layer.route.call(torch.tensor([2, 2])):
        expected = layer.base_layer(x) + x @ reference_delta(layer, 2, 32, 24).T
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


def test_token_routing_without_the_contrastive_loss_has_no_task_embedding_table():
    for router_input, contrastive, has_table in (
        ("token", 0.0, False),
        ("token", 0.1, True),  # the contrastive loss trains it
        ("task", 0.0, True),
        ("task+token", 0.0, True),
    ):
        layer = make_layer(router_input=router_input, contrastive_weight=contrastive, randomize=False)
        assert ("default" in layer.ept_task_embedding) is has_table, (router_input, contrastive)
    layer = make_layer(router_input="token", contrastive_weight=0.0, randomize=False)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    layer(x).sum().backward()  # routes without ids or a table
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


def planned(layer):
    """``layer`` with the tuner's route-entry plan (which groups each task uses, rows per task) for one layer."""

    def plan(call):
        layer.accept_plan(call, layer.plan_request(call).tolist())

    layer.route.planner = plan
    return layer


@pytest.mark.parametrize(
    "d_in,d_out,overrides",
    [(24, 32, {}), (27, 34, {"gate_form": "code"}), (26, 35, {"expert_form": "code1d"}), (26, 30, {"alp": False})],
)
@pytest.mark.parametrize("min_saving", [experts.DILATED_MIN_SAVING, 0])  # 0: kron2d's down by convolution
def test_mixed_batch_paths_equal_the_per_row_dense_reference(d_in, d_out, overrides, min_saving, monkeypatch):
    """Mixed-task rows through each task's own factors (enough tokens per task; the shared down factors applied
    as products, or as dilated convolutions) and, inside generate, through the Kronecker structure per row (few
    tokens) all equal W0 x + ΔW_task(row) x per row (float64, 1e-10); ΔW from the independent reference, or
    without ALP (separate seed blocks, which it does not model) from the experts built literally with transposed
    convolutions."""
    monkeypatch.setattr(experts, "DILATED_MIN_SAVING", min_saving)
    layer = planned(make_layer(d_in, d_out, **overrides))
    with torch.no_grad():
        deltas = [
            layer.delta_weight("default", t)
            if overrides.get("alp") is False
            else reference_delta(layer, t, d_out, d_in)
            for t in range(3)
        ]
    mixed, in_task_order = torch.tensor([2, 0, 1, 0, 2, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    taken = []
    for name in ("_add_rows_by_task", "_route_factors"):
        original = getattr(type(layer), name)
        monkeypatch.setattr(type(layer), name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k))
    for ids, tokens, generating in [  # 48 x 6 rows >= TOKENS_PER_TASK x 3 tasks
        (mixed, 48, False),
        (in_task_order, 48, False),
        (mixed, 1, True),
        (mixed, 3, True),
    ]:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if generating:
                stack.enter_context(layer.route.generation())
            stack.enter_context(layer.route.call(ids))
            taken.clear()
            for _ in range(2):  # the second from the call's cached factors (and a decoding step's buffers)
                x = torch.randn(6, tokens, d_in)
                expected = [layer.base_layer(x[i]) + x[i] @ deltas[t].T for i, t in enumerate(ids.tolist())]
                torch.testing.assert_close(layer(x), torch.stack(expected), rtol=0, atol=1e-10)
        assert taken == (["_route_factors"] if generating else ["_add_rows_by_task"] * 2)


@pytest.mark.parametrize("base_dtype", [torch.float64, torch.bfloat16])
def test_decoding_steps_see_changed_weights_and_a_lower_precision_base(base_dtype, monkeypatch):
    """Decoding steps of a mixed-task ``generate`` call (a prompt, then one token per row) reuse the call's gathered
    pass (built three times: at the prompt and after each change); an in-place change of the kernels or of the
    router (halved logits: the same top-k, other weights) between steps is seen at the next step, and a base in
    another dtype than the adapter gets the change rounded to its dtype once, as on every other path."""
    layer = planned(make_layer(26, 30))  # ceil + crop: 26 and 30 are not multiples of every kernel size
    built = []
    original = type(layer)._route_factors
    monkeypatch.setattr(type(layer), "_route_factors", lambda *a, **k: built.append(1) or original(*a, **k))
    layer.base_layer.to(base_dtype)
    ids = torch.tensor([2, 0, 1, 0])

    def expected(x):
        deltas = [reference_delta(layer, t, 30, 26) for t in ids.tolist()]
        change = torch.stack([x[i].double() @ deltas[i].T for i in range(len(ids))])
        return layer.base_layer(x) + change.to(base_dtype)

    tolerance = {"rtol": 0, "atol": 1e-10} if base_dtype == torch.float64 else {"rtol": 1.6e-2, "atol": 1e-2}
    with torch.no_grad(), layer.route.generation(), layer.route.call(ids):
        for step, tokens in enumerate([3, 1, 1, 1, 1]):
            if step == 2:
                layer.ept_kernels["default"].mul_(-0.5)  # as an optimizer step between two decoding steps
            if step == 3:
                layer.ept_gate["default"].weight.mul_(0.5)
                layer.ept_gate["default"].bias.mul_(0.5)
            x = torch.randn(4, tokens, 26, dtype=torch.float64).to(base_dtype)
            torch.testing.assert_close(layer(x), expected(x), **tolerance)
    assert len(built) == 3


def test_a_call_keeps_the_plan_it_reused_when_another_call_replaces_the_layers_meanwhile():
    """Calls share a layer's last plan (threads of a server): a call that reuses it keeps it for itself, even
    where another call replaces the layer's plan between this call's request and its acceptance."""
    layer = make_layer()
    ids = torch.tensor([2, 0, 1, 0])
    x = torch.randn(4, 40, 24, dtype=torch.float64)

    def plan(call):
        request = layer.plan_request(call)
        known = layer._known_routes.get("default")
        if known is not None:  # marks any use of the replacement: every expert flipped
            layer._known_routes["default"] = known._replace(table=known.table.clone(), used=[1 - u for u in known.used])
        layer.accept_plan(call, request.tolist())

    layer.route.planner = plan
    expected = torch.stack(
        [layer.base_layer(x[i]) + x[i] @ reference_delta(layer, t, 32, 24).T for i, t in enumerate(ids.tolist())]
    )
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the first one's plan
            with layer.route.call(ids):
                torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("tokens", [48, 1])  # rows grouped by task; decoding steps of a generate call
def test_a_router_change_within_a_call_that_flips_the_top_k_is_seen(tokens):
    """The groups a call runs are planned at route entry; a router changed in place during the call so that some
    task picks other experts (negated logits: the bottom two of four distinct ones) makes the layer plan again,
    and its outputs equal the reference with the new weights (float64, 1e-10)."""
    layer = planned(make_layer(24, 32, kernel_sizes=[2, 4, 6, 8]))
    ids = torch.tensor([2, 0, 1, 0, 2, 1])

    def chosen():
        return [set(w.nonzero().flatten().tolist()) for w in layer.task_weights("default")]

    with torch.no_grad(), layer.route.generation(), layer.route.call(ids):
        before = chosen()
        for step in range(3):
            if step == 1:
                layer.ept_gate["default"].weight.neg_()
                layer.ept_gate["default"].bias.neg_()
                assert all(now.isdisjoint(old) for now, old in zip(chosen(), before))
            x = torch.randn(6, tokens, 24, dtype=torch.float64)
            deltas = [reference_delta(layer, t, 32, 24) for t in ids.tolist()]
            expected = torch.stack([layer.base_layer(x[i]) + x[i] @ deltas[i].T for i in range(len(ids))])
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["kron2d", "code1d"])
def test_rows_by_task_train_like_the_shared_path(form, monkeypatch):
    """With autograd, rows grouped by task (enough tokens per task) give the same loss and gradients as the shared
    path that mixes kernels per row (float64, 1e-10)."""
    x, ids = torch.randn(6, 48, 24, dtype=torch.float64), torch.tensor([2, 0, 1, 0, 2, 1])
    results = []
    for threshold in (ept_layer.TOKENS_PER_TASK, 10**9):  # the second never groups rows by task
        monkeypatch.setattr(ept_layer, "TOKENS_PER_TASK", threshold)
        layer = planned(make_layer(expert_form=form))
        with layer.route.call(ids):
            loss = layer(x).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}))
    (grouped, grouped_grads), (shared, shared_grads) = results
    torch.testing.assert_close(grouped, shared, rtol=0, atol=1e-10)
    assert grouped_grads.keys() == shared_grads.keys()
    for name in grouped_grads:
        torch.testing.assert_close(grouped_grads[name], shared_grads[name], rtol=1e-9, atol=1e-10, msg=name)
