"""The FFN blocks MixLoRA turns into expert mixtures: how each computes, and which modules a config adapts.

Every supported FFN has the form ``FFN(x) = out(hidden(in_1(x), ..., in_j(x)))``: linears applied to the block
input, an elementwise hidden function, and one output linear. A :class:`FfnRecipe` names those parts, so one
expert-mixture layer serves all of them:

* gated MLP (LLaMA, Mistral, Qwen2): ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``;
* T5 ``DenseReluDense``: ``wo(dropout(act(wi(x))))``; gated T5 (v1.1): ``wo(dropout(act(wi_0(x)) * wi_1(x)))``;
* BERT: ``BertIntermediate`` computes ``intermediate_act_fn(dense(x))`` and its sibling ``BertOutput`` applies
  ``output.dense`` before its own dropout and residual LayerNorm. The FFN is ``output.dense ∘ intermediate``;
  the recipe's output linear therefore lives in the FFN module's parent (``output_in_parent``), and is adapted by
  a second layer that receives the route from the first (see ``layer.ExpertOutput``).

Recipes are recognised by structure (attribute names and types), not by class, so architectures that reuse these
layouts are covered; an FFN matched by ``ffn_modules`` with any other layout is rejected with an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@dataclass(frozen=True)
class FfnRecipe:
    """One FFN layout: its input linears, hidden function and output linear (attribute names)."""

    name: str
    inputs: tuple[str, ...]
    output: str  # attribute of the FFN module, or a dotted path from its parent when ``output_in_parent``
    extras: tuple[str, ...]  # other attributes the hidden function uses
    hidden: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]
    output_in_parent: bool = False

    @property
    def own_linears(self) -> tuple[str, ...]:
        """The linears inside the FFN module itself (all but a split FFN's output linear)."""
        return self.inputs if self.output_in_parent else (*self.inputs, self.output)

    def matches(self, module: nn.Module) -> bool:
        return all(isinstance(getattr(module, n, None), nn.Linear) for n in self.own_linears) and all(
            hasattr(module, n) for n in self.extras
        )

    @property
    def output_name(self) -> str:
        """The output linear's own attribute name (``dense`` for BERT's ``output.dense``)."""
        return self.output.rpartition(".")[2]


RECIPES = (
    FfnRecipe("gated_mlp", ("gate_proj", "up_proj"), "down_proj", ("act_fn",), lambda m, h: m.act_fn(h[0]) * h[1]),
    FfnRecipe("t5_gated", ("wi_0", "wi_1"), "wo", ("act", "dropout"), lambda m, h: m.dropout(m.act(h[0]) * h[1])),
    FfnRecipe("t5_dense", ("wi",), "wo", ("act", "dropout"), lambda m, h: m.dropout(m.act(h[0]))),
    FfnRecipe(
        "bert", ("dense",), "output.dense", ("intermediate_act_fn",), lambda m, h: m.intermediate_act_fn(h[0]), True
    ),
)


def recipe_for(module: nn.Module, key: str) -> FfnRecipe:
    for recipe in RECIPES:
        if recipe.matches(module):
            return recipe
    raise TypeError(
        f"ffn_modules matched {key!r} ({type(module).__name__}), which is not an FFN layout MixLoRA supports: "
        "a gated MLP (gate_proj/up_proj/down_proj + act_fn), T5 DenseReluDense (wi/wo or wi_0/wi_1/wo) or BERT's "
        "intermediate (dense + intermediate_act_fn, with a sibling output.dense). Point ffn_modules at such modules."
    )


def name_matches(spec, key: str) -> bool:
    """PEFT's target_modules semantics: a regex string must match the whole key, a name the key or its suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{name}") for name in spec)


def unwrap(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


@dataclass
class FfnPlan:
    """Which modules of one model a config turns into mixtures.

    ``ffn`` maps each FFN module's key to its recipe; ``outputs`` maps the key of a split FFN's output linear
    (BERT's ``output.dense``) to its FFN module's key.
    """

    ffn: dict[str, FfnRecipe] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    def owns(self, key: str) -> bool:
        """Whether ``key`` is an adapted FFN module or a split FFN's output linear."""
        return key in self.ffn or key in self.outputs

    def inside(self, key: str) -> bool:
        """Whether ``key`` lies strictly inside a module the experts own (so no other adapter may wrap it)."""
        parent = key.rpartition(".")[0]
        while parent:
            if self.owns(parent):
                return True
            parent = parent.rpartition(".")[0]
        return False


def build_plan(model: nn.Module, config) -> FfnPlan:
    """Match ``config.ffn_modules`` (minus ``exclude_modules``) against ``model`` and check every match."""
    plan = FfnPlan()
    for key, module in model.named_modules():
        if not key or not name_matches(config.ffn_modules, key) or name_matches(config.exclude_modules, key):
            continue
        recipe = recipe_for(unwrap(module), key)
        plan.ffn[key] = recipe
        if recipe.output_in_parent:
            parent = key.rpartition(".")[0]
            out_key = f"{parent}.{recipe.output}" if parent else recipe.output
            try:
                linear = unwrap(model.get_submodule(out_key))
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear):
                raise TypeError(
                    f"MixLoRA's {recipe.name} FFN at {key!r} needs its output linear at {out_key!r}, found none."
                )
            plan.outputs[out_key] = key
    if not plan.ffn:
        raise ValueError(
            f"ffn_modules={config.ffn_modules!r} matched no module of this model: name the FFN modules to mix "
            "(e.g. 'mlp' for LLaMA, 'DenseReluDense' for T5, 'intermediate' for BERT)."
        )
    return plan
