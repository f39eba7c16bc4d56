"""Shared builders and round-trip checks for the method tests (tiny models from ``conftest``, nothing downloaded)."""

import torch
from peft import PeftModel, get_peft_model
from transformers import T5Config, T5ForConditionalGeneration

from conftest import TINY_BUILDERS, TINY_TARGETS, tiny_batch
from pyramid_peft import export_lora, make_peft_config, merge_for_task
from pyramid_peft.registry import METHODS

# T5-base as in the EPT paper's Table 2: original ReLU FFN, adapters on q, k, v, o, wi, wo (192 modules).
T5_BASE_TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def t5_base_skeleton() -> T5ForConditionalGeneration:
    """T5-base's shapes on the meta device: no memory, no init cost; enough to count parameters."""
    config = T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, feed_forward_proj="relu")
    with torch.device("meta"):
        return T5ForConditionalGeneration(config)


def peft_tiny(family: str, config, seed: int = 0):
    """A tiny model of ``family`` adapted with ``config`` (whose target_modules are filled in), in eval mode."""
    config.target_modules = set(TINY_TARGETS[family])
    return get_peft_model(TINY_BUILDERS[family](seed), config).eval()


def reproducible_config(name: str, **settings):
    """The config of method ``name`` without randomness in training (no dropout, no router jitter) and, for TuckA,
    centroids made at creation rather than from the first batch: runs that split or move the work (several
    processes, another device) then compute the same thing as one reference run."""
    fields = METHODS[name].config_cls.__dataclass_fields__
    fixed = {"lora_dropout": 0.0, "jitter_noise": 0.0, "centroid_init": "kaiming"}
    return make_peft_config(name, **{k: v for k, v in fixed.items() if k in fields}, **settings)


def perturb(model, scale: float = 0.1, seed: int = 0) -> None:
    """Add noise to every trainable tensor, as training would, so zero-initialised factors matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * scale)


def main_output(model, batch: dict, **kwargs) -> torch.Tensor:
    """Logits of LM families, the last hidden state of encoders."""
    out = model(**batch, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def adapted_shapes(model) -> list[tuple[int, int]]:
    """(d_in, d_out) of every adapted linear."""
    tuner = model.base_model
    return [(layer.in_features, layer.out_features) for _, layer in tuner.routed_layers()]


def assert_save_reload_exact(model, family: str, tmp_path, **call) -> None:
    """save_pretrained -> PeftModel.from_pretrained on a fresh base with the same seed gives identical outputs."""
    batch = tiny_batch(family)
    before = main_output(model, batch, **call)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(TINY_BUILDERS[family](), tmp_path).eval()
    torch.testing.assert_close(main_output(reloaded, batch, **call), before, rtol=0, atol=0)


def assert_merge_and_export_match(model, family: str, tmp_path, task: int, task_ids: torch.Tensor) -> dict:
    """merge_for_task and export_lora (loaded by stock PEFT) reproduce the routed model for ``task_ids``."""
    batch = tiny_batch(family)
    expected = main_output(model, batch, task_ids=task_ids)
    merged = merge_for_task(model, task)
    torch.testing.assert_close(main_output(merged, batch), expected, rtol=0, atol=1e-5)
    report = export_lora(model, task, tmp_path)
    exported = PeftModel.from_pretrained(TINY_BUILDERS[family](), tmp_path).eval()
    assert exported.peft_config["default"].peft_type.value == "LORA"
    torch.testing.assert_close(main_output(exported, batch), expected, rtol=0, atol=1e-5)
    return report


def generate_with_beams(model, family: str, task_ids: torch.Tensor) -> torch.Tensor:
    batch = tiny_batch(family)
    return model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        task_ids=task_ids,
        num_beams=2,
        max_new_tokens=3,
        do_sample=False,
    )


def training_loss(model, batch: dict, **kwargs) -> torch.Tensor:
    """The LM loss where the family has one; for encoders a loss that reaches every layer, the pooler included."""
    out = model(**batch, **kwargs)
    if getattr(out, "loss", None) is not None:
        return out.loss
    return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()


def adapter_grads(model, container: str) -> list[torch.Tensor]:
    """The gradient of ``container`` (e.g. ``"multilora_A"``) of the default adapter in every adapted layer."""
    grads = []
    for _, layer in model.base_model.routed_layers():
        entry = getattr(layer, container)["default"]
        params = [entry] if isinstance(entry, torch.nn.Parameter) else list(entry.parameters())
        grads.extend(p.grad if p.grad is not None else torch.zeros_like(p) for p in params)
    return grads


def assert_equals_base(model, batch: dict, **call) -> None:
    """The adapted output equals the same model with its adapters disabled, exactly.

    Compared on the same weights: freezing alone can change which attention kernel runs, and two copies of a model
    can differ by an ulp in their BLAS sums.
    """
    with model.disable_adapter():
        expected = main_output(model, batch)
    torch.testing.assert_close(main_output(model, batch, **call), expected, rtol=0, atol=0)
