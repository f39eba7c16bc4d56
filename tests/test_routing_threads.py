"""Routing state belongs to the call: concurrent calls on one model, and backward passes in another thread.

Every routed method (MixLoRA on BERT's split FFN included) is called from several threads at once, each thread with
its own batch and task ids; every output and every auxiliary loss must equal the one computed alone. Gradient
checkpointing re-runs layers inside ``backward``: running that backward in another thread than the forward (as
autograd's device threads do on CUDA) must give the gradients of a backward in the forward's own thread, and the
backward passes of two calls running at once must each re-run their own call's route.
"""

import sys
import threading

import pytest
import torch
from peft import get_peft_model

from conftest import TINY_BUILDERS, tiny_batch
from pyramid_peft import Routing, aux_loss, make_peft_config
from pyramid_peft.registry import METHODS

TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "bert": ["query", "value"]}
THREADS, CALLS = 4, 6


def routed_model(method: str, family: str, seed: int = 0):
    config = make_peft_config(method, target_modules=TARGETS[family], num_tasks=4)
    if hasattr(config, "lora_dropout"):
        config.lora_dropout = 0.0
    model = get_peft_model(TINY_BUILDERS[family](seed), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every factor off its (often zero) init, so each task's adapter differs
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.2)
    return model


def thread_inputs(family: str, thread: int) -> tuple[dict, torch.Tensor]:
    """Thread ``thread``'s batch (its own tokens and padding) and task ids (mostly its own task)."""
    batch = tiny_batch(family, batch=3, seq=5 + thread, seed=10 + thread)
    batch.pop("labels", None)
    return batch, torch.tensor([thread, thread, (thread + 1) % 4])


def outputs(model, batch: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**batch, task_ids=ids)
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return main.detach(), aux_loss(model).detach()


def run_concurrently(work, count: int) -> list:
    """``work(i)`` in ``count`` threads started together; their results, or the first exception raised."""
    results, errors, start = [None] * count, [], threading.Barrier(count)

    def target(i):
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as error:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: every interleaving gets its chance
    try:
        threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]
    return results


CASES = [(method, "bert") for method in sorted(METHODS)] + [("ept", "llama"), ("tucka", "llama")]


@pytest.mark.parametrize(("method", "family"), CASES)
def test_concurrent_calls_each_get_their_own_route_and_aux_losses(method, family):
    model = routed_model(method, family).eval()
    inputs = [thread_inputs(family, i) for i in range(THREADS)]
    outputs(model, *inputs[0])  # TuckA's data-aware centroid init happens at the first forward
    expected = [outputs(model, *inputs[i]) for i in range(THREADS)]
    if model.base_model.capabilities().routing is Routing.TASK:  # another task's adapter gives another output
        assert not torch.allclose(expected[0][0], outputs(model, inputs[0][0], inputs[0][1] * 0 + 3)[0])

    def work(i):
        return [outputs(model, *inputs[i]) for _ in range(CALLS)]

    for i, calls in enumerate(run_concurrently(work, THREADS)):
        for main, aux in calls:
            torch.testing.assert_close(main, expected[i][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(aux, expected[i][1], rtol=1e-5, atol=1e-6)


def checkpointed_gradients(method: str, family: str, reentrant: bool, backward_thread: bool) -> dict:
    model = routed_model(method, family).train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    batch, ids = thread_inputs(family, 1)
    out = model(**batch, task_ids=ids)
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    loss = main.pow(2).mean() + aux_loss(model)
    if backward_thread:
        run_concurrently(lambda _: loss.backward(), 1)
    else:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("method", "family"), [("ept", "llama"), ("mixlora", "bert"), ("tucka", "llama")])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_backward_in_another_thread_gives_the_same_gradients(method, family, reentrant):
    own = checkpointed_gradients(method, family, reentrant, backward_thread=False)
    other = checkpointed_gradients(method, family, reentrant, backward_thread=True)
    assert own.keys() == other.keys() and len(own) > 4
    for name, grad in own.items():
        torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("method", "family"), [("ept", "llama"), ("mixlora", "bert"), ("tucka", "llama")])
@pytest.mark.parametrize("reentrant", [False, True])
def test_backwards_of_two_checkpointed_calls_at_once_each_read_their_own_route(method, family, reentrant):
    """Two checkpointed forwards with different task ids, then both backward passes at once in two threads: each
    recomputation reads the route of the call that recorded it, so the summed gradients equal those of each call
    run alone."""
    model = routed_model(method, family).train()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    for module in model.modules():  # a re-run restores the global CPU generator, which two threads would share
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs = [thread_inputs(family, i) for i in (1, 2)]

    def loss_of(i: int) -> torch.Tensor:
        out = model(**inputs[i][0], task_ids=inputs[i][1])
        main = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return main.pow(2).mean() + aux_loss(model)

    for i in range(2):  # alone: the gradients of both accumulate
        loss_of(i).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    losses = [loss_of(0), loss_of(1)]
    run_concurrently(lambda i: losses[i].backward(), 2)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 4
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
