"""What every registered method does as a PEFT method, one behaviour per test, parametrized over the registry.

Modelled on the behaviours PEFT's generic suite checks: build, forward (with task ids; a mixed batch equals its
examples alone unless the method routes by batch), save / reload, disable / enable, adding, switching and deleting
adapters (deleting leaves nothing behind), merge / unmerge / ``merge_and_unload`` (equal to ``merge_for_task``)
or a clear refusal, adapter dtypes and outputs on float16 / bfloat16 bases, and training that updates adapter
parameters only. Tiny T5 models (a few milliseconds each) are built per test from one cached base state. Per-method
test files keep only each method's own maths; a toy plug-in method in its own package passes the same checks.
"""

import sys
import textwrap

import pytest
import torch
from _models import main_output, perturb, training_loss
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from conftest import TINY_BUILDERS, tiny_batch
from pyramid_peft import (
    Merging,
    NotMergeableError,
    Routing,
    TaskRoutingError,
    aux_loss,
    count_parameters,
    export_lora,
    make_peft_config,
    merge_for_task,
)
from pyramid_peft.methods.base import RoutedLayer
from pyramid_peft.registry import METHODS

# attention projections of each tiny family: every method can adapt them (MixLoRA adds its FFN experts itself)
TARGETS = {"t5": ["q", "k", "v", "o"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "bert": ["query", "value"]}
IDS = torch.tensor([0, 2, 1, 2])
NAMES = sorted(METHODS)
TASK = 1  # the task merged where a method merges per task
# float16 / bfloat16 against float32, relative Frobenius error of the outputs: float16 keeps 11 significant bits,
# bfloat16 8, and the error of a tiny model's few layers stays under 8 and 32 ulps of each (measured: up to 2e-3
# and 8e-2).
HALF_TOLERANCE = {torch.float16: 8 * 2.0**-11, torch.bfloat16: 32 * 2.0**-8}


def tiny_base(family: str = "t5", dtype: torch.dtype = torch.float32):
    """The family's tiny model, seed 0 (a few milliseconds)."""
    return TINY_BUILDERS[family]().to(dtype)


def build(name: str, family: str = "t5", dtype=torch.float32, adapter_dtype: bool = True, **options):
    config = make_peft_config(name, target_modules=TARGETS[family], num_tasks=3, **options)
    model = get_peft_model(tiny_base(family, dtype), config, autocast_adapter_dtype=adapter_dtype)
    perturb(model)  # zero-initialised factors would hide terms
    return model.eval()


def call(model, batch=None, family="t5", ids=IDS):
    return main_output(model, batch or tiny_batch(family), task_ids=ids)


def capabilities(model):
    return model.base_model.capabilities()


def merge_ids(model) -> torch.Tensor:
    """The task ids under which the routed model equals its merge for :data:`TASK`."""
    return IDS if capabilities(model).merging is Merging.PER_MODEL else torch.full((4,), TASK)


def mergeable(name: str) -> bool:
    return build(name).base_model.capabilities().mergeable


# -- build and forward -------------------------------------------------------------------------------------------
def check_build(name: str) -> None:
    spec, model = METHODS[name], build(name)
    config = model.peft_config["default"]
    assert type(config) is spec.config_cls and config.peft_type == spec.peft_type == name.upper()
    assert config.peft_type.value == name.upper()  # PEFT's own code reads `.value`
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(spec.prefix in n for n in trainable)
    assert all(type(layer).method_key == name for _, layer in model.base_model.routed_layers())
    report = count_parameters(model)
    assert report["total"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert report["modules"] == len(model.base_model.routed_layers()) and report["per_task"] == report["total"] / 3


@pytest.mark.parametrize("name", NAMES)
def test_build_names_the_method_and_trains_only_its_parameters(name):
    check_build(name)


def check_forward(name: str, family: str) -> None:
    model = build(name, family)
    batch = tiny_batch(family)
    out = call(model, batch, family)
    assert torch.isfinite(out).all()
    routing = capabilities(model).routing
    if routing is Routing.TASK:
        with pytest.raises(TaskRoutingError):
            main_output(model, batch)
    if routing is not Routing.BATCH:  # a batch-routed method routes the whole batch at once, by design
        alone = [call(model, {k: v[i : i + 1] for k, v in batch.items()}, family, IDS[i : i + 1]) for i in range(4)]
        torch.testing.assert_close(out, torch.cat(alone), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_forward_routes_each_example(name, family):
    check_forward(name, family)


def test_peft_mixed_models_refuse_our_methods_with_peft_s_own_error():
    with pytest.raises(ValueError, match="'EPT' is not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_base(), make_peft_config("ept", target_modules=TARGETS["t5"]), mixed=True)


# -- save, disable, adapters --------------------------------------------------------------------------------------
def check_save_reload(name: str, tmp_path) -> None:
    model = build(name)
    before = call(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_base(), tmp_path).eval()
    torch.testing.assert_close(call(reloaded), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_reproduce_the_outputs_exactly(name, tmp_path):
    check_save_reload(name, tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_disable_gives_the_base_model_and_enable_gives_the_adapter_back(name):
    model = build(name)
    batch = tiny_batch("t5")
    adapted = call(model, batch)
    with model.disable_adapter():
        base = main_output(model, batch)
    # another copy of the base may differ by an ulp in its BLAS sums: compared exactly on the same weights only
    torch.testing.assert_close(base, main_output(tiny_base(), batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(call(model, batch), adapted, rtol=0, atol=0)
    model.base_model.disable_adapter_layers()
    torch.testing.assert_close(main_output(model, batch), base, rtol=0, atol=0)
    model.base_model.enable_adapter_layers()
    torch.testing.assert_close(call(model, batch), adapted, rtol=0, atol=0)


def with_second_adapter(name: str):
    """(a model with a second adapter ``other``, the output of its first adapter before ``other`` was added)."""
    model = build(name)
    first = call(model)  # a method with a data-aware init (TuckA) makes it here, before the second adapter's
    model.add_adapter("other", make_peft_config(name, target_modules=TARGETS["t5"], num_tasks=3))
    model.set_adapter("other")
    perturb(model, seed=1)
    model.set_adapter("default")
    return model.eval(), first


@pytest.mark.parametrize("name", NAMES)
def test_a_second_adapter_is_its_own_and_switching_back_restores_the_first(name):
    model, first = with_second_adapter(name)
    torch.testing.assert_close(call(model), first, rtol=0, atol=0)
    model.set_adapter("other")
    assert not torch.allclose(call(model), first)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other" in n for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(call(model), first, rtol=0, atol=0)


def held_adapter_names(module) -> set[str]:
    """Adapter names still held anywhere on ``module``: keys of every dict (or PEFT container) among its
    attributes, sub-modules, parameters and buffers, and of its tuner's shared route."""
    held = set()
    for value in [*vars(module).values(), *module._modules.values()]:
        if hasattr(value, "keys") and not isinstance(value, torch.Tensor):
            held.update(k for k in list(value) if isinstance(k, str))
        for table in ("owners", "routes", "pinned"):
            held.update(getattr(value, table, {}).keys())
    return held


@pytest.mark.parametrize("name", NAMES)
def test_delete_adapter_leaves_nothing_behind(name):
    model, before = with_second_adapter(name)
    layers = [layer for _, layer in model.base_model.routed_layers()]
    assert all("other" in held_adapter_names(layer) for layer in layers)
    model.delete_adapter("other")
    assert all("other" not in held_adapter_names(layer) for layer in layers)
    assert "other" not in held_adapter_names(model.base_model) and "other" not in model.peft_config
    assert not [n for n in model.state_dict() if ".other" in n]
    torch.testing.assert_close(call(model), before, rtol=0, atol=0)


# -- merging --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_merge_and_unload_equals_merge_for_task_and_the_routed_model(name, tmp_path):
    model = build(name)
    if not capabilities(model).mergeable:
        reason = capabilities(model).reason
        attempts = (
            model.merge_and_unload,
            lambda: model.merge_adapter(task_id=TASK),
            lambda: merge_for_task(model, TASK),
            lambda: export_lora(model, TASK, tmp_path / "export"),
        )
        for attempt in attempts:
            with pytest.raises(NotMergeableError) as refused:
                attempt()
            assert METHODS[name].title in str(refused.value) and reason in str(refused.value)
        assert not (tmp_path / "export").exists() and model.base_model.routed_layers()
        return
    batch = tiny_batch("t5")
    expected = call(model, batch, ids=merge_ids(model))
    copy = merge_for_task(model, TASK)
    merged = model.merge_and_unload(task_id=TASK)
    assert not any(isinstance(m, RoutedLayer) for m in merged.modules())
    torch.testing.assert_close(main_output(merged, batch), main_output(copy, batch), rtol=0, atol=0)
    torch.testing.assert_close(main_output(merged, batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_merge_adapter_then_unmerge_adapter_restores_the_weights(name):
    model = build(name)
    if not capabilities(model).mergeable:
        pytest.skip("refusal checked by test_merge_and_unload_equals_merge_for_task_and_the_routed_model")
    batch = tiny_batch("t5")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    expected = call(model, batch, ids=merge_ids(model))
    task = None if capabilities(model).merging is Merging.PER_MODEL else TASK
    model.merge_adapter(task_id=task, safe_merge=True)
    assert all(layer.merged for _, layer in model.base_model.routed_layers())
    torch.testing.assert_close(call(model, batch, ids=merge_ids(model)), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:  # W + ΔW - ΔW, each step rounded once to float32
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(call(model, batch), call(build(name), batch), rtol=0, atol=1e-5)


# -- half precision ----------------------------------------------------------------------------------------------
def half_twin(name: str, dtype: torch.dtype, adapter_dtype: bool):
    """(float32 model, the same weights on a ``dtype`` base built with ``autocast_adapter_dtype=adapter_dtype``)."""
    full = build(name)
    call(full)  # methods with a data-aware init (TuckA's centroids) make it here, in float32
    half = build(name, dtype=dtype, adapter_dtype=adapter_dtype)
    set_peft_model_state_dict(half, get_peft_model_state_dict(full))
    return full, half.eval()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_adapter_dtypes_follow_autocast_adapter_dtype(name, dtype):
    for autocast, expected in ((True, torch.float32), (False, dtype)):
        model = build(name, dtype=dtype, adapter_dtype=autocast)
        dtypes = {p.dtype for n, p in model.named_parameters() if METHODS[name].prefix in n and p.is_floating_point()}
        assert dtypes == {expected}, f"autocast_adapter_dtype={autocast}"
        assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} <= {dtype, torch.float32}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_outputs_are_finite_and_close_to_float32(name, dtype, tmp_path):
    full, half = half_twin(name, dtype, adapter_dtype=False)
    batch = tiny_batch("t5")
    expected = call(full, batch)
    out = call(half, batch)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, expected) < HALF_TOLERANCE[dtype]
    if not capabilities(half).mergeable:
        return
    routed = call(half, batch, ids=merge_ids(half))
    merged = merge_for_task(half, TASK)
    assert relative_error(main_output(merged, batch), routed) < HALF_TOLERANCE[dtype]
    export_lora(half, TASK, tmp_path / "export")
    exported = PeftModel.from_pretrained(tiny_base(dtype=dtype), tmp_path / "export").eval()
    assert relative_error(main_output(exported, batch), routed) < HALF_TOLERANCE[dtype]


# -- training ------------------------------------------------------------------------------------------------------
def check_training(name: str, steps: int = 2) -> None:
    model = build(name)
    batch = tiny_batch("t5")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers() if METHODS[name].prefix not in n}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        (training_loss(model, batch, task_ids=IDS) + aux_loss(model)).backward()
        optimiser.step()
        optimiser.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable and all(METHODS[name].prefix in n for n in changed)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers() if n in buffers)


@pytest.mark.parametrize("name", NAMES)
def test_training_updates_adapter_parameters_only(name):
    check_training(name)


# -- a new method is one folder and one import -----------------------------------------------------------------------
TOY_PACKAGE = '''
"""A toy method: LoRA with a learned output scale, s * (alpha / r) * B A x."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyramid_peft.methods.base import AdaptedLinear, RoutedLayer
from pyramid_peft.methods.capabilities import Capabilities, Merging, Routing
from pyramid_peft.methods.config_base import RoutedConfig, check_dropout
from pyramid_peft.methods.spec import MethodSpec, register_method


@dataclass
class ScaledLoraConfig(RoutedConfig):
    r: int = field(default=4)
    lora_alpha: float = field(default=8)
    lora_dropout: float = field(default=0.0)

    def __post_init__(self):
        super().__post_init__()
        check_dropout(self.lora_dropout)

    def capabilities(self):
        return Capabilities(Routing.NONE, Merging.PER_MODEL)


class ScaledLoraLayer(RoutedLayer):
    adapter_layer_names = ("toylora_A", "toylora_B", "toylora_scale")
    other_param_names = ("toylora_config",)

    def __init__(self, base_layer, route):
        super().__init__(base_layer, route)
        self.toylora_A, self.toylora_B, self.toylora_scale = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.toylora_dropout = nn.ModuleDict()
        self.toylora_config = {}

    def update_layer(self, adapter_name, config):
        self.toylora_config[adapter_name] = config
        self.toylora_A[adapter_name] = nn.Parameter(torch.empty(config.r, self.in_features))
        self.toylora_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, config.r))
        self.toylora_scale[adapter_name] = nn.Parameter(torch.ones(()))
        nn.init.kaiming_uniform_(self.toylora_A[adapter_name], a=math.sqrt(5))
        self.add_dropout(adapter_name, config.lora_dropout)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _adapter_output(self, adapter_name, x):
        A, B = self.toylora_A[adapter_name], self.toylora_B[adapter_name]
        x = self._cast_input_dtype(x, A.dtype)
        hidden = F.linear(self.toylora_dropout[adapter_name](x), A)
        return self.toylora_scale[adapter_name] * self.scaling(adapter_name) * F.linear(hidden, B)

    def task_lora_factors(self, adapter_name, task_id):
        up = self.toylora_scale[adapter_name] * self.scaling(adapter_name) * self.toylora_B[adapter_name]
        return up, self.toylora_A[adapter_name]


class Linear(AdaptedLinear, ScaledLoraLayer):
    pass


register_method(MethodSpec(ScaledLoraConfig, "toylora", "ScaledLoRA", layer_cls=Linear))
'''


def test_a_toy_method_in_its_own_package_registers_with_one_import_and_passes_the_checks(tmp_path, monkeypatch):
    package = tmp_path / "plugins" / "toy_scaled_lora"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(TOY_PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    try:
        import toy_scaled_lora  # noqa: F401  (the one registration import)

        assert "toylora" in METHODS and make_peft_config("toylora", target_modules=["q"]).peft_type == "TOYLORA"
        assert METHODS["toylora"].tuner_cls.__name__ == "ScaledLoraModel"
        check_build("toylora")
        check_forward("toylora", "t5")
        check_save_reload("toylora", tmp_path / "saved")
        check_training("toylora")
        model = build("toylora")
        torch.testing.assert_close(
            main_output(model.merge_and_unload(), tiny_batch("t5")), call(build("toylora")), rtol=0, atol=1e-5
        )
    finally:
        METHODS.pop("toylora", None)
        sys.modules.pop("toy_scaled_lora", None)
