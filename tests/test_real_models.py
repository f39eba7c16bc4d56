"""EPT on the two real pretrained models that install offline (MiniLM-L6, SmolLM2-135M)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from pyramid_peft import EptConfig, aux_loss, export_lora, merge_for_task
from pyramid_peft.methods.base import find_tuners
from pyramid_peft.models import minilm_path, smollm2_path

pytestmark = pytest.mark.slow

MINILM_TARGETS = ["query", "key", "value", "dense"]
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def perturb(model, scale=0.05):
    """Move every adapter weight off its initial value (seeded), as training would."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)
    return model


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    return path, AutoTokenizer.from_pretrained(path)


def test_minilm_train_step_merge_export_and_reload(minilm, tmp_path):
    path, tokenizer = minilm
    batch = tokenizer(["a great movie", "the cat sat on the mat today", "no"], padding=True, return_tensors="pt")
    ids = torch.tensor([0, 3, 7])
    model = get_peft_model(
        AutoModel.from_pretrained(path),
        EptConfig(target_modules=MINILM_TARGETS, exclude_modules=["pooler.dense"], num_tasks=8),
    )
    assert len(find_tuners(model)[0].routed_layers()) == 6 * 6  # every linear of the 6 blocks
    out = model(**batch, task_ids=ids)
    (out.last_hidden_state.pow(2).mean() + aux_loss(model)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model = perturb(model, 0.02).eval()
    routed = model(**batch, task_ids=torch.full((3,), 5)).last_hidden_state
    # Float32 rounding accumulates over 6 layers of activations up to ~10 in size: the tolerance is relative to the
    # output's scale (the 1e-5 absolute bound is checked on the tiny models, tests/test_merge.py).
    tolerance = 1e-5 * routed.abs().max()
    assert (merge_for_task(model, 5)(**batch).last_hidden_state - routed).abs().max() <= tolerance
    export_lora(model, 5, tmp_path / "lora")
    lora = PeftModel.from_pretrained(AutoModel.from_pretrained(path), tmp_path / "lora").eval()
    assert (lora(**batch).last_hidden_state - routed).abs().max() <= tolerance
    model.save_pretrained(tmp_path / "ept")
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(path), tmp_path / "ept").eval()
    torch.testing.assert_close(
        reloaded(**batch, task_ids=torch.full((3,), 5)).last_hidden_state, routed, rtol=0, atol=0
    )


def test_smollm2_train_step_generate_and_merge(smollm2):
    path, tokenizer = smollm2
    tokenizer.padding_side = "left"
    prompts = ["The capital of France is", "Two plus two equals"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, EptConfig(target_modules=SMOLLM2_TARGETS, num_tasks=4))
    ids = torch.tensor([0, 2])
    out = model(**batch, labels=batch["input_ids"], task_ids=ids)
    (out.loss + aux_loss(model)).backward()
    # the default start is LoRA's (B = 0): every seed factor B gets a gradient at once, the kernels a step later
    seeds_b = [p.grad for n, p in model.named_parameters() if "ept_B" in n]
    assert len(seeds_b) == 30 * 6 and all(g.abs().sum() > 0 for g in seeds_b)
    model = perturb(model, 0.02).eval()
    generated = model.generate(
        **batch, task_ids=ids, num_beams=2, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)
    routed = model(**batch, task_ids=torch.full((2,), 2)).logits
    merged = merge_for_task(model, 2)
    assert (merged(**batch).logits - routed).abs().max() <= 1e-4 * routed.abs().max()
