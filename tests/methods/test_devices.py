"""Every routed method on the test device (EPT_TEST_DEVICE, e.g. cuda; the CPU by default) computes what it computes
on the CPU: training loss (auxiliary terms included), gradients and greedy generation with task ids given on the CPU.

On the CPU this checks that a copy moved with ``.to(device)`` keeps routing; on an accelerator it is the check that
nothing in a routed forward or backward stays behind on the host. Tolerances: float32 on two devices (different
kernels and summation orders), 1e-4 relative.
"""

import copy

import pytest
import torch
from _models import perturb, reproducible_config, training_loss
from peft import get_peft_model

from conftest import build_tiny_llama, on_device, tiny_batch
from pyramid_peft import aux_loss
from pyramid_peft.registry import METHODS

pytestmark = pytest.mark.device

IDS = torch.tensor([0, 2, 1, 2])  # on the CPU: routing places them on the model's device
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # MixLoRA adds its FFN experts itself
RTOL, ATOL = 1e-4, 1e-5


def build(name: str):
    model = get_peft_model(build_tiny_llama(), reproducible_config(name, target_modules=TARGETS, num_tasks=3))
    perturb(model)
    return model


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = training_loss(model, batch, task_ids=IDS) + aux_loss(model)
    loss.backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), grads


def greedy(model, batch: dict) -> torch.Tensor:
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return model.generate(**inputs, task_ids=IDS, max_new_tokens=3, do_sample=False, pad_token_id=0).cpu()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_routed_method_trains_and_generates_on_the_test_device(name, device):
    model = build(name)
    moved = copy.deepcopy(model).to(device)
    batch = tiny_batch("llama")

    loss, grads = loss_and_grads(model, batch)
    moved_loss, moved_grads = loss_and_grads(moved, on_device(batch, device))
    torch.testing.assert_close(moved_loss, loss, rtol=RTOL, atol=ATOL)
    assert moved_grads.keys() == grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(moved_grads[key], grad, rtol=RTOL, atol=ATOL, msg=key)

    assert torch.equal(greedy(moved, on_device(batch, device)), greedy(model, batch))
