"""Parameter accounting on a T5-base-shaped skeleton (nothing downloaded): the counts of arXiv 2603.12577, Table 2."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import T5Config, T5ForConditionalGeneration

from pyramid_peft import EptConfig, count_parameters

T5_BASE = dict(vocab_size=32128, d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64)
TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def t5_base_skeleton():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return T5ForConditionalGeneration(T5Config(**T5_BASE))


@pytest.mark.parametrize(
    "form,total,without_router",
    [("code1d", 6_489_600, 3_244_032), ("kron2d", 4_913_664, 1_668_096)],
)
def test_t5_base_counts_match_the_spec(form, total, without_router):
    config = EptConfig(
        target_modules=TARGETS,
        num_tasks=8,
        r=8,
        lora_alpha=32,
        top_k=2,
        kernel_sizes=[2, 2, 4, 4, 6, 6, 8, 8],
        expert_form=form,
    )
    with torch.device("meta"):
        model = get_peft_model(t5_base_skeleton(), config)
    counts = count_parameters(model)
    assert counts["modules"] == 192
    assert counts["total"] == total
    assert counts["adapter"] == without_router
    assert counts["router"] + counts["task_embedding"] == 3_245_568
    assert counts["per_task"] == total / 8 and counts["per_task_without_router"] == without_router / 8
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == total


def test_stock_lora_counts_as_adapter_weights():
    with torch.device("meta"):
        model = get_peft_model(t5_base_skeleton(), LoraConfig(target_modules=TARGETS, r=8))
    counts = count_parameters(model, num_tasks=8)
    assert counts["adapter"] == counts["total"] == 3_244_032
    assert counts["per_task"] == 405_504


def test_per_module_breakdown_follows_the_appendix_c_formula():
    config = EptConfig(target_modules=["q"], num_tasks=8, r=8, kernel_sizes=[2, 2, 4, 4, 6, 6, 8, 8])
    with torch.device("meta"):
        model = get_peft_model(t5_base_skeleton(), config)
    per_module = count_parameters(model, per_module=True)["per_module"]
    first = per_module["base_model.model.encoder.block.0.layer.0.SelfAttention.q"]
    assert first["adapter"] == 2 * 384 * 8 + 2 * (4 + 16 + 36 + 64)  # 6,384 (Appendix C)
    assert first["router"] == 8 * 768 + 8 and first["task_embedding"] == 8 * 768
