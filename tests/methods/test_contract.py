"""The contract every registered method keeps, checked for each entry of the registry (and a toy plug-in method).

Build, forward with task ids (a mixed batch equals its examples alone unless the method routes by batch), gradients
and one optimiser step, save/reload, merge and export where the declared capabilities allow it (a clear refusal
naming the method and the reason where they do not), and parameter accounting. Per-method test files keep only
each method's own maths.
"""

import sys
import textwrap

import pytest
import torch
from _models import assert_merge_and_export_match, assert_save_reload_exact, main_output, perturb, training_loss
from peft import get_peft_model

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
from pyramid_peft.registry import METHODS

# attention projections of each tiny family: every method can adapt them (MixLoRA adds its FFN experts itself)
TARGETS = {"t5": ["q", "k", "v", "o"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "bert": ["query", "value"]}
IDS = torch.tensor([0, 2, 1, 2])


def build(name: str, family: str):
    model = get_peft_model(TINY_BUILDERS[family](), make_peft_config(name, target_modules=TARGETS[family], num_tasks=3))
    perturb(model)  # zero-initialised factors would hide terms
    return model.eval()


def check_build(name: str, model) -> None:
    spec = METHODS[name]
    config = model.peft_config["default"]
    assert type(config) is spec.config_cls and config.peft_type == spec.peft_type == name.upper()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(spec.prefix in n for n in trainable)
    assert model.base_model.routed_layers()


def check_forward(model, family: str) -> None:
    batch = tiny_batch(family)
    out = main_output(model, batch, task_ids=IDS)
    assert torch.isfinite(out).all()
    with model.disable_adapter():
        assert not torch.allclose(main_output(model, batch), out)
    routing = model.base_model.capabilities().routing
    if routing is Routing.TASK:
        with pytest.raises(TaskRoutingError):
            main_output(model, batch)
    if routing is not Routing.BATCH:  # a batch-routed method routes the whole batch at once, by design
        alone = [
            main_output(model, {k: v[i : i + 1] for k, v in batch.items()}, task_ids=IDS[i : i + 1])
            for i in range(len(IDS))
        ]
        torch.testing.assert_close(out, torch.cat(alone), rtol=1e-4, atol=1e-5)


def check_training_step(model, family: str) -> None:
    batch = tiny_batch(family)
    before = main_output(model, batch, task_ids=IDS).detach()
    loss = training_loss(model, batch, task_ids=IDS) + aux_loss(model)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(p.requires_grad for n, p in model.named_parameters() if n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.zero_grad()
    assert not torch.equal(main_output(model, batch, task_ids=IDS), before)


def check_merge_or_refusal(name: str, model, family: str, tmp_path) -> None:
    capabilities = model.base_model.capabilities()
    if capabilities.merging is Merging.NONE:
        for attempt in (lambda: merge_for_task(model, 0), lambda: export_lora(model, 0, tmp_path / "export")):
            with pytest.raises(NotMergeableError) as refused:
                attempt()
            assert METHODS[name].title in str(refused.value) and capabilities.reason in str(refused.value)
        assert not (tmp_path / "export").exists()
        with pytest.raises(NotMergeableError):
            model.merge_and_unload()
        return
    task = 1
    ids = IDS if capabilities.merging is Merging.PER_MODEL else torch.full((4,), task)
    assert_merge_and_export_match(model, family, tmp_path / "export", task, ids)


def check_accounting(model) -> None:
    report = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["total"] == trainable and report["modules"] == len(model.base_model.routed_layers())
    assert report["per_task"] == trainable / 3


def check_contract(name: str, family: str, tmp_path) -> None:
    model = build(name, family)
    check_build(name, model)
    check_forward(model, family)
    check_accounting(model)
    check_merge_or_refusal(name, model, family, tmp_path)
    assert_save_reload_exact(model, family, tmp_path / "saved", task_ids=IDS)
    check_training_step(model, family)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_keeps_the_contract(name, family, tmp_path):
    check_contract(name, family, tmp_path)


# -- a new method is one folder and one import -----------------------------------------------------------------------
TOY_PACKAGE = '''
"""A toy method: LoRA with a learned output scale, s * (alpha / r) * B A x."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pyramid_peft.methods.base import AdaptedLinear, RoutedLayer, RoutedTuner
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


class ScaledLoraModel(RoutedTuner):
    tuner_layer_cls = ScaledLoraLayer
    layer_cls = Linear


register_method(MethodSpec(ScaledLoraConfig, ScaledLoraModel, "toylora", "ScaledLoRA"))
'''


def test_a_toy_method_in_its_own_package_registers_with_one_import_and_keeps_the_contract(tmp_path, monkeypatch):
    package = tmp_path / "plugins" / "toy_scaled_lora"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(TOY_PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    try:
        import toy_scaled_lora  # noqa: F401  (the one registration import)

        assert "toylora" in METHODS and make_peft_config("toylora", target_modules=["q"]).peft_type == "TOYLORA"
        check_contract("toylora", "t5", tmp_path)
    finally:
        METHODS.pop("toylora", None)
        sys.modules.pop("toy_scaled_lora", None)
