"""Quantized bases (bitsandbytes on CPU): the config section, k-bit training of a routed method, the merge into a
dequantized copy and the LoRA export, each against the routed model."""

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from conftest import tiny_batch
from pyramid_peft import export_lora, make_peft_config, merge_for_task
from pyramid_peft.models import load_model, resolve_model
from pyramid_peft.models.quantized import Quantization, is_quantized
from pyramid_peft.training.config import ConfigError, from_dict
from pyramid_peft.training.export import export_run
from pyramid_peft.training.run import evaluate_run, train

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore")  # bitsandbytes warns on every 8-bit call that it casts to float16

# 4-bit blocks hold 64 weights and bitsandbytes' CPU kernels want whole blocks: 64 features, not conftest's 32.
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
QUANTIZED_LINEAR = {4: "Linear4bit", 8: "Linear8bitLt"}


def quantized_ept(bits: int, seed: int = 0):
    """A tiny LLaMA loaded in ``bits`` with EPT on it (no dropout: train and eval mode compute the same)."""
    torch.manual_seed(seed)
    base = load_model(resolve_model(None, config_overrides=TINY_LLAMA), quantization={"bits": bits})
    config = make_peft_config(
        "ept", r=2, lora_alpha=4, kernel_sizes=[2, 4], top_k=1, lora_dropout=0.0, num_tasks=2, target_modules=TARGETS
    )
    config.task_type = "CAUSAL_LM"
    return get_peft_model(base, config)


def perturbed(model, seed: int = 0):
    """Noise on every trainable tensor, as training leaves it, so the zero-initialised up-projections matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def logits(model, **call) -> torch.Tensor:
    batch = {k: v for k, v in tiny_batch("llama").items() if k != "labels"}
    with torch.no_grad():
        return model(**batch, **call).logits


# -- the config section -------------------------------------------------------------------------------------------
def tiny_config(**quantization) -> dict:
    return {
        "model": {"config": TINY_LLAMA, "tokenizer": "minilm-l6", "quantization": quantization},
        "method": {"name": "ept", "r": 2},
        "tasks": ["rte"],
        "training": {"max_steps": 1},
    }


def test_the_section_becomes_a_bitsandbytes_config():
    four = Quantization(bits=4, quant_type="fp4", double_quant=False).bnb_config("bfloat16")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4" and not four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16  # the model's dtype where none is given
    assert Quantization(compute_dtype="float16").bnb_config("float32").bnb_4bit_compute_dtype == torch.float16
    eight = Quantization(bits=8, int8_threshold=4.0, skip_modules=["lm_head"]).bnb_config()
    assert eight.load_in_8bit and eight.llm_int8_threshold == 4.0 and eight.llm_int8_skip_modules == ["lm_head"]


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"bits": 3}, "model.quantization.bits=3 must be 4 or 8"),
        ({"bits": "4"}, "model.quantization.bits='4' is a str"),
        ({"bit": 4}, "unknown key 'model.quantization.bit'. Did you mean 'bits'?"),
        ({"bits": 4, "quant_type": "int4"}, "model.quantization.quant_type='int4' must be one of nf4, fp4"),
        ({"bits": 4, "compute_dtype": "float64"}, "model.quantization.compute_dtype='float64'"),
        ({"bits": 8, "quant_type": "fp4"}, "model.quantization.quant_type applies to 4-bit bases only"),
        ({"bits": 4, "int8_threshold": 3.0}, "model.quantization.int8_threshold applies to 8-bit bases only"),
    ],
)
def test_a_bad_section_is_named_before_anything_loads(section, named):
    with pytest.raises(ConfigError) as err:
        from_dict(tiny_config(**section))
    assert named in str(err.value)


def test_full_fine_tuning_of_a_quantized_base_is_refused():
    raw = tiny_config(bits=4)
    raw["method"] = {"name": "full"}
    with pytest.raises(ConfigError, match="quantized weights do not train: use an adapter method"):
        from_dict(raw)


def test_a_nested_override_sets_one_key_of_the_section():
    from pyramid_peft.training.config import parse_overrides, set_dotted

    raw = tiny_config(bits=4, quant_type="nf4")
    for key, value in parse_overrides(["--model.quantization.quant_type", "fp4"]).items():
        set_dotted(raw, key, value)
    assert from_dict(raw).model.quantization == {"bits": 4, "quant_type": "fp4"}


# -- k-bit training of a routed method ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_ept_trains_on_a_quantized_base_and_leaves_it_frozen(bits):
    model = quantized_ept(bits).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer()).__name__ == QUANTIZED_LINEAR[bits]
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(".ept_" in name or "ept" in name.split(".")[-2] for name in trainable)  # adapters only
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    batch, task_ids = tiny_batch("llama"), torch.tensor([0, 1, 0, 1])
    losses = []
    for _ in range(8):
        loss = model(**batch, task_ids=task_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in frozen.items())  # the base never moves


# -- merge and export ---------------------------------------------------------------------------------------------
# The merged model is W_deq + ΔW in float32, where W_deq is bitsandbytes' own dequantization of the base weight.
# Against the routed model computing with that same dequantized weight (bitsandbytes' CPU path in training mode) it
# agrees to float32 rounding. bitsandbytes' inference kernels round on their own: LLM.int8() quantizes activations
# to int8 (8-bit); on CPUs with AVX512-BF16 the 4-bit kernel multiplies in bfloat16. That costs up to 1% of the
# logits' range here (measured: 0.003 and 0.005 of 0.7); the test allows 2%.
@pytest.mark.parametrize("bits", [4, 8])
def test_merge_on_a_quantized_base_is_a_dequantized_model_that_matches_the_routed_one(bits, tmp_path):
    model = perturbed(quantized_ept(bits))
    task_ids = torch.ones(4, dtype=torch.long)
    dequantized_path = logits(model.train(), task_ids=task_ids)  # dropout is 0: training mode only picks the kernel
    merged = merge_for_task(model, 1)
    assert not is_quantized(merged) and not hasattr(merged.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert type(merged.model.layers[0].self_attn.k_proj) is torch.nn.Linear  # unadapted layers dequantized too
    merged_logits = logits(merged.eval())
    torch.testing.assert_close(merged_logits, dequantized_path, rtol=0, atol=1e-5)
    inference_path = logits(model.eval(), task_ids=task_ids)
    torch.testing.assert_close(merged_logits, inference_path, rtol=0, atol=0.02 * inference_path.abs().max().item())
    assert is_quantized(model.base_model.model)  # the routed model is left as it was
    merged.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), merged_logits)


@pytest.mark.parametrize("bits", [4, 8])
def test_exported_lora_on_the_same_quantized_base_reproduces_the_routed_model(bits, tmp_path):
    model = perturbed(quantized_ept(bits)).eval()
    expected = logits(model, task_ids=torch.zeros(4, dtype=torch.long))
    export_lora(model, 0, tmp_path)
    torch.manual_seed(0)
    base = load_model(resolve_model(None, config_overrides=TINY_LLAMA), quantization={"bits": bits})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = PeftModel.from_pretrained(base, tmp_path).eval()
    assert type(stock.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    torch.testing.assert_close(logits(stock), expected, rtol=0, atol=1e-5)


# -- the pipeline ---------------------------------------------------------------------------------------------------
def test_a_4bit_run_trains_evaluates_and_exports(tiny_experiment, tmp_path):
    raw = tiny_experiment("causal", tasks=("rte",), max_steps=2, save_steps=2)
    raw["model"]["config"].update(hidden_size=64, intermediate_size=128)
    raw["model"]["quantization"] = {"bits": 4}
    results = train(from_dict(raw))
    run = raw["training"]["output_dir"]
    assert evaluate_run(run)["tasks"] == results["tasks"]  # the eval rebuilds the same 4-bit base
    lora = export_run(run, "rte", "lora", tmp_path / "lora")
    assert (lora / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(export_run(run, "rte", "merged", tmp_path / "merged"))
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_gradient_checkpointing_reaches_every_adapter_on_a_quantized_base():
    model = quantized_ept(4).train()  # the inputs require grad (models/quantized.py): reentrant checkpointing works
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model(**tiny_batch("llama"), task_ids=torch.tensor([0, 1, 0, 1])).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
