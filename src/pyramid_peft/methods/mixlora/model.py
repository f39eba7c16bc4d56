"""MixLoRA as a PEFT tuner: FFN modules become expert mixtures, attention linears get plain LoRA."""

from __future__ import annotations

from peft.tuners.tuners_utils import check_target_module_exists

from ..base import RoutedTuner
from .config import DEFAULT_ATTENTION_MODULES, DEFAULT_FFN_MODULES, MixLoraConfig
from .ffn import FfnPlan, build_plan
from .layer import ExpertOutput, FeedForward, Linear, MixLoraLayer


class MixLoraModel(RoutedTuner):
    """Injects MixLoRA layers: :class:`FeedForward` on every module named by ``ffn_modules`` (plus, for BERT's
    split FFN, :class:`ExpertOutput` on the sibling ``output.dense``) and :class:`Linear` on ``target_modules``.

    Matching takes two steps inside PEFT's injection: ``_prepare_model`` finds and checks the FFN modules
    (the :class:`~pyramid_peft.methods.mixlora.ffn.FfnPlan`), then ``_check_target_module_exists`` answers for
    each module name from that plan and from ``target_modules``.
    """

    tuner_layer_cls = MixLoraLayer
    layer_cls = Linear

    def _prepare_adapter_config(self, peft_config: MixLoraConfig, model_config: dict) -> MixLoraConfig:
        """Fill ``ffn_modules`` and ``target_modules`` from the model type where they are not given."""
        model_type = model_config.get("model_type")
        for field, defaults in (("ffn_modules", DEFAULT_FFN_MODULES), ("target_modules", DEFAULT_ATTENTION_MODULES)):
            if getattr(peft_config, field) is not None:
                continue
            if model_type not in defaults:
                raise ValueError(
                    f"MixLoraConfig has no default {field} for model_type={model_type!r} (defaults exist for "
                    f"{sorted(defaults)}): pass {field} explicitly."
                )
            setattr(peft_config, field, set(defaults[model_type]))
        return peft_config

    def _prepare_model(self, peft_config: MixLoraConfig, model) -> None:
        self._ffn_plan: FfnPlan = build_plan(model, peft_config)

    def _check_target_module_exists(self, peft_config: MixLoraConfig, key: str):
        plan = self._ffn_plan
        if plan.owns(key):
            return True
        found = check_target_module_exists(peft_config, key)
        if plan.inside(key):
            if found:
                raise ValueError(
                    f"target_modules={peft_config.target_modules!r} matches {key!r}, a linear inside a "
                    "MixLoRA FFN: the experts adapt the FFN linears. Keep target_modules to attention projections."
                )
            return False
        return found

    def _new_module(self, config, adapter_name, target, current_key):
        plan = self._ffn_plan
        if current_key in plan.ffn:
            return FeedForward(target, adapter_name, config, self.route, recipe=plan.ffn[current_key])
        if current_key in plan.outputs:
            ffn = self.model.get_submodule(plan.outputs[current_key])
            if not isinstance(ffn, FeedForward):
                raise RuntimeError(f"MixLoRA must adapt {plan.outputs[current_key]!r} before {current_key!r}.")
            return ExpertOutput(
                target, adapter_name, config, self.route, name=ffn.recipe.output_name, handoff=ffn.handoff
            )
        return super()._new_module(config, adapter_name, target, current_key)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Unloading puts a whole FFN module back; PEFT's version would try to re-attach a `weight` it does not have.
        if isinstance(child, FeedForward) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)
