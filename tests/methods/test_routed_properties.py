"""Property tests of EPT and the task-routed peers (MOELoRA, MoRE, TuckA with per-example routing).

Hypothesis generates the layer shapes (divisible, not divisible, odd, tiny), each method's options, the dtype, the
batch and the task-id mix; every property is checked against the float64 references of ``_reference.py``:

* a mixed-task batch equals the reference and its examples run one at a time (train and eval mode, with and without
  gradients);
* ``merge_for_task`` and ``export_lora`` (loaded by stock PEFT) equal the routed output;
* ``save_pretrained`` -> ``PeftModel.from_pretrained`` reproduces the outputs exactly;
* EPT's literal transposed-convolution experts equal the factored ones.

The number of examples comes from the Hypothesis profile (``tests/conftest.py``; ``HYPOTHESIS_PROFILE=ci`` for more).
"""

import tempfile

import _reference as ref
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

from pyramid_peft import EptConfig, MoeLoraConfig, MoreConfig, TuckaConfig, export_lora, merge_for_task
from pyramid_peft.methods.tucka import fixed_route

NUM_TASKS = 4
DIMS = st.one_of(st.integers(1, 4), st.sampled_from([8, 12, 16, 24]), st.integers(5, 33))  # tiny, divisible, any


class Pair(nn.Module):
    """Two adapted linears in a row, q: d_in -> d_mid and o: d_mid -> d_out."""

    def __init__(self, d_in: int, d_mid: int, d_out: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.q = nn.Linear(d_in, d_mid)
        self.o = nn.Linear(d_mid, d_out)

    def forward(self, x):
        return self.o(self.q(x))


# -- generated cases -------------------------------------------------------------------------------------------------
@st.composite
def ept_configs(draw, mergeable: bool = False):
    kernels = draw(st.lists(st.integers(1, 8), min_size=1, max_size=5))  # repeated, single, unsorted
    return EptConfig(
        target_modules=["q", "o"],
        num_tasks=NUM_TASKS,
        lora_dropout=0.0,
        kernel_sizes=kernels,
        r=draw(st.integers(1, 4)),
        lora_alpha=draw(st.sampled_from([1.0, 4.0, 8.0])),
        top_k=draw(st.integers(1, len(kernels))),
        expert_form=draw(st.sampled_from(["kron2d", "code1d"])),
        alp=draw(st.booleans()),
        dim_scale=draw(st.sampled_from(["none", "rank_sq", "rank_lin", "coord_lin"])),
        gate_form=draw(st.sampled_from(["paper", "code"])),
        router_tau=draw(st.sampled_from([1.0, 0.5])),
        router_input="task" if mergeable else draw(st.sampled_from(["task", "token", "task+token"])),
        kernel_init="kaiming",
        contrastive_weight=draw(st.sampled_from([0.0, 0.1])),
        contrastive_modules="all",
    )


@st.composite
def moelora_configs(draw):
    experts = draw(st.integers(1, 4))
    return MoeLoraConfig(
        target_modules=["q", "o"],
        num_tasks=NUM_TASKS,
        lora_dropout=0.0,
        num_experts=experts,
        r=experts * draw(st.integers(1, 2)),
        task_embedding_dim=draw(st.integers(1, 6)),
        lora_alpha=4.0,
    )


@st.composite
def more_configs(draw):
    r = draw(st.integers(1, 5))
    return MoreConfig(
        target_modules=["q", "o"],
        num_tasks=NUM_TASKS,
        lora_dropout=0.0,
        r=r,
        num_experts=draw(st.integers(1, r)),
        rank_scale=draw(st.booleans()),
        route_mode=draw(st.sampled_from(["intended", "reference"])),
        lora_alpha=4.0,
        contrastive_weight=draw(st.sampled_from([0.0, 0.1])),
    )


@st.composite
def tucka_configs(draw):
    return TuckaConfig(
        target_modules=["q", "o"],
        num_tasks=NUM_TASKS,
        routing="example",
        r=draw(st.integers(1, 3)),
        k=draw(st.integers(1, 3)),
        t=draw(st.integers(1, 3)),
        p=draw(st.integers(1, 2)),
        alpha=draw(st.sampled_from([1.0, 2.0])),
        centroid_init="kaiming",
    )


ROUTED = st.one_of(ept_configs(), moelora_configs(), more_configs(), tucka_configs())
MERGEABLE = st.one_of(ept_configs(mergeable=True), moelora_configs(), more_configs(), tucka_configs())


@st.composite
def cases(draw, configs):
    """(model, x, task_ids, dtype): a randomised adapted Pair and a batch for it."""
    config = draw(configs)
    dims = (draw(DIMS), draw(DIMS), draw(DIMS))
    if isinstance(config, TuckaConfig):
        assume(config.r <= min(dims[0], dims[1]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    model = build(config, dims, seed, dtype)
    batch, seq = draw(st.integers(1, 4)), draw(st.integers(0, 3))  # seq 0: rows without a sequence axis
    task_ids = torch.tensor(draw(st.lists(st.integers(0, NUM_TASKS - 1), min_size=batch, max_size=batch)))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *([seq] if seq else []), dims[0], generator=g, dtype=torch.float64).to(dtype)
    return model, x, task_ids, dtype


def build(config, dims, seed: int, dtype):
    """get_peft_model on a Pair with every adapter tensor random (no zero factor hides a term).

    Cases whose kernel sizes or rank do not fit the generated shapes are discarded (``assume``)."""
    try:
        model = get_peft_model(Pair(*dims, seed), config)
    except ValueError as error:
        assume("do not fit" not in str(error) and "larger than" not in str(error))
        raise
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
        for _, layer in model.base_model.routed_layers():
            for flag in getattr(layer, "tucka_centroids_ready", {}).values():
                flag.fill_(True)
    return model.to(dtype).eval()


# -- the reference forward -------------------------------------------------------------------------------------------
def reference_forward(model, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    layers = dict(model.base_model.routed_layers())
    q, o = layers["q"], layers["o"]
    if hasattr(q, "tucka_config"):
        rows = ref._f64(x).reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)
        routes = [ref.tucka_route(q, row) for row in rows]
        return _per_example(x, [lambda lay, i=i: ref.tucka_delta(lay, *routes[i]) for i in range(len(routes))], q, o)
    if hasattr(q, "ept_config"):
        return ref.ept_output(o, ref.ept_output(q, x, task_ids), task_ids)
    delta = ref.moelora_delta if hasattr(q, "moelora_config") else ref.more_delta
    return _per_example(x, [lambda lay, t=int(t): delta(lay, t) for t in task_ids], q, o)


def _per_example(x, deltas, q, o) -> torch.Tensor:
    out = []
    for i, delta_of in enumerate(deltas):
        h = ref.base_output(q, x[i]) + ref._f64(x[i]) @ delta_of(q).T
        out.append(ref.base_output(o, h) + h @ delta_of(o).T)
    return torch.stack(out)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    tol = (1e-10 if dtype == torch.float64 else 2e-5) * scale
    torch.testing.assert_close(ref._f64(actual), ref._f64(expected), rtol=0, atol=tol)


def fresh_base(model) -> Pair:
    """The Pair the model was built from, rebuilt from its frozen weights."""
    q, o = model.base_model.model.q.get_base_layer(), model.base_model.model.o.get_base_layer()
    pair = Pair(q.in_features, q.out_features, o.out_features, 0)
    pair.load_state_dict({"q.weight": q.weight, "q.bias": q.bias, "o.weight": o.weight, "o.bias": o.bias})
    return pair.to(q.weight.dtype)


# -- properties ------------------------------------------------------------------------------------------------------
@given(case=cases(ROUTED), train=st.booleans(), grad=st.booleans())
def test_mixed_batch_equals_the_reference_and_its_examples_one_at_a_time(case, train, grad):
    model, x, task_ids, dtype = case
    model.train(train)
    with torch.set_grad_enabled(grad):
        mixed = model(x, task_ids=task_ids)
        alone = torch.cat([model(x[i : i + 1], task_ids=task_ids[i : i + 1]) for i in range(x.shape[0])])
    assert_near(mixed, reference_forward(model, x, task_ids), dtype)
    assert_near(mixed, alone, dtype)


@given(case=cases(MERGEABLE), data=st.data())
def test_merge_for_task_and_exported_lora_equal_the_routed_output(case, data):
    model, x, _, dtype = case
    task = data.draw(st.integers(0, NUM_TASKS - 1))
    ids = torch.full((x.shape[0],), task)
    if isinstance(model.peft_config["default"], TuckaConfig):  # merge one fixed route: that of example 0
        group, weights = ref.tucka_route(model.base_model.model.q, ref._f64(x[0]).reshape(-1, x.shape[-1]).mean(0))
        x = x[:1]
        pinned = fixed_route(model, group, weights.to(dtype))
        ids = ids[:1]
    else:
        pinned = torch.no_grad()
    routed = model(x, task_ids=ids)
    with pinned:
        merged = merge_for_task(model, task)
        with tempfile.TemporaryDirectory() as out:
            export_lora(model, task, out)
            exported = PeftModel.from_pretrained(fresh_base(model), out).eval()
            from_lora = exported(x)
    assert_near(merged(x), routed, dtype)
    assert_near(from_lora, routed, dtype)
    assert_near(routed, reference_forward(model, x, ids), dtype)


@given(case=cases(ROUTED))
def test_save_and_reload_is_exact(case):
    model, x, task_ids, _ = case
    before = model(x, task_ids=task_ids)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        reloaded = PeftModel.from_pretrained(fresh_base(model), path).eval()
        after = reloaded(x, task_ids=task_ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@given(case=cases(ept_configs(mergeable=True)), data=st.data())
def test_literal_transposed_convolutions_equal_the_factored_experts(case, data):
    model, x, _, dtype = case
    task = data.draw(st.integers(0, NUM_TASKS - 1))
    with torch.no_grad():
        for _, layer in model.base_model.routed_layers():
            literal = layer.delta_weight("default", task)
            up, down = layer.task_lora_factors("default", task)
            expected = ref.ept_delta(layer, ref.ept_task_weights(layer)[task])
            assert_near(literal, expected, dtype)
            assert_near(up @ down, expected, dtype)
        ids = torch.full((x.shape[0],), task)
        factored = model(x, task_ids=ids)
        for _, layer in model.base_model.routed_layers():
            layer.ept_config["default"].materialize = True
        assert_near(model(x, task_ids=ids), factored, dtype)


# -- generate with mixed tasks and beams -----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [EptConfig, EptConfig.reference_code], ids=["kron2d", "code1d"])
def test_generate_with_mixed_tasks_and_beams_equals_one_example_at_a_time(make):
    from conftest import build_tiny_t5, tiny_batch

    config = make(
        target_modules=["q", "v", "wi"],
        num_tasks=NUM_TASKS,
        r=2,
        lora_alpha=8,
        kernel_sizes=[4, 2, 4, 1],
        top_k=2,
        lora_dropout=0.0,
        kernel_init="kaiming",
    )
    model = get_peft_model(build_tiny_t5(), config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    batch = tiny_batch("t5")
    batch["attention_mask"][:] = 1  # per-example generation has no padding: keep the batch without it too
    ids = torch.tensor([0, 3, 1, 3])
    call = dict(num_beams=3, num_return_sequences=2, max_new_tokens=4, do_sample=False)
    mixed = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], task_ids=ids, **call)
    for i in range(4):
        alone = model.generate(input_ids=batch["input_ids"][i : i + 1], task_ids=ids[i : i + 1], **call)
        assert torch.equal(mixed[2 * i : 2 * i + 2, : alone.shape[1]], alone)
