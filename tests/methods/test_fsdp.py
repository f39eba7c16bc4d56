"""Every routed method trains under FSDP2 (``torch.distributed.fsdp.fully_shard``) like one process.

Two gloo processes on the CPU shard a tiny LLaMA (each decoder layer, then the whole model) and train it on their
halves of each batch, auxiliary losses included (EPT's and MoRE's contrastive term, MixLoRA's balance term). The
reference is one unsharded process running the same two halves and averaging their losses, which is what data
parallelism computes (losses with batch statistics, MixLoRA's Switch balance loss and TuckA's batch routes, are
per-process by definition). EPT also trains with non-reentrant gradient checkpointing, and its adapter saved from the
sharded model (a full state dict) resumes training under FSDP and exports as plain LoRA. What cannot work sharded
(TuckA's data-aware centroid init, EPT's contrastive term under reentrant checkpointing) fails with an error that
says why.

Accelerate's FSDP plugin does not run on a CPU (a CPU launch is DDP, the plugin is ignored): see
docs/sharded-training.md.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import perturb, reproducible_config, training_loss
from peft import PeftModel, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from conftest import build_tiny_llama, tiny_batch
from pyramid_peft import aux_loss, export_lora, make_peft_config
from pyramid_peft.registry import METHODS

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 2
IDS = torch.tensor([0, 1, 2, 3])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # MixLoRA adds its FFN experts itself
# Runs: a method, and whether its decoder layers are gradient-checkpointed (non-reentrant, the transformers default).
RUNS = [(name, False) for name in sorted(METHODS)] + [("ept", True)]
# Measured on this CPU the sharded losses and weights equal one process's to the bit; the tolerance leaves room for a
# reduce-scatter that sums in another order (other builds and backends).
RTOL, ATOL = 1e-5, 1e-6


def build(name: str, checkpointing: bool = False, adapter_dir=None, reentrant: bool = False):
    """A tiny LLaMA adapted with ``name`` (default auxiliary losses on, no randomness in training), in train mode."""
    base = build_tiny_llama()
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True).train()
    model = get_peft_model(base, reproducible_config(name, target_modules=TARGETS, num_tasks=4))
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    perturb(model)  # zero-initialised factors would hide terms
    return model.train()


def halves(step: int) -> list[tuple[dict, torch.Tensor]]:
    """Step ``step``'s global batch of four rows (four tasks) as the two processes' halves."""
    batch = tiny_batch("llama", batch=4, seed=step)
    return [({k: v[2 * r : 2 * r + 2] for k, v in batch.items()}, IDS[2 * r : 2 * r + 2]) for r in range(WORLD)]


def train(model, steps: range, rank: int | None = None) -> list[float]:
    """SGD steps on the halves: this rank's half when sharded (FSDP averages the gradients), else both halves."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    losses = []
    for step in steps:
        parts = halves(step) if rank is None else [halves(step)[rank]]
        total = 0.0
        for batch, ids in parts:
            loss = (training_loss(model, batch, task_ids=ids) + aux_loss(model)) / len(parts)
            loss.backward()
            total += loss.detach()
        if rank is not None:
            dist.all_reduce(total)
            total /= WORLD
        losses.append(float(total))
        optimizer.step()
        optimizer.zero_grad()
    return losses


def trained(model) -> dict[str, torch.Tensor]:
    """The whole trainable tensors (gathered from the shards: every rank must call this)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def shard(model):
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, checkpointing in RUNS:
            model = shard(build(name, checkpointing))
            results[name, checkpointing] = train(model, range(STEPS), rank), trained(model)
            if (name, checkpointing) == ("ept", False):
                state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if rank == 0:  # the adapter as PEFT saves it, from the gathered state dict
                    model.save_pretrained(os.path.join(folder, "adapter"), state_dict=state)
                dist.barrier()
                resumed = shard(build(name, adapter_dir=os.path.join(folder, "adapter")))
                results["resumed"] = train(resumed, range(STEPS, STEPS + 1), rank), trained(resumed)
        check_refusals(rank)
        if rank == 0:
            torch.save(results, os.path.join(folder, "results.pt"))
    finally:
        dist.destroy_process_group()


def check_refusals(rank: int) -> None:
    """What cannot work sharded says why: TuckA's data-aware centroid init, and the contrastive term of a forward
    without autograd (reentrant checkpointing) on a sharded task-embedding table."""
    batch, ids = halves(0)[rank]
    tucka = get_peft_model(build_tiny_llama(), make_peft_config("tucka", target_modules=TARGETS))
    with pytest.raises(RuntimeError, match="centroid_init='kaiming'"):
        training_loss(tucka, batch)
    model = shard(build("ept", checkpointing=True, reentrant=True))
    training_loss(model, batch, task_ids=ids)
    with pytest.raises(RuntimeError, match="use_reentrant"):
        aux_loss(model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The two-process runs: {(method, checkpointing) or "resumed": (losses, trained tensors)}, and their folder."""
    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return torch.load(folder / "results.pt"), folder


@pytest.mark.parametrize("name, checkpointing", RUNS, ids=[f"{n}{'-checkpointed' if c else ''}" for n, c in RUNS])
def test_sharded_training_matches_one_process(sharded, name, checkpointing):
    losses, weights = sharded[0][name, checkpointing]
    model = build(name, checkpointing)
    expected = train(model, range(STEPS))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=RTOL, atol=0)
    reference = trained(model)
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[key], tensor, rtol=RTOL, atol=ATOL, msg=key)
    aux_terms = {"ept": {"contrastive"}, "more": {"contrastive"}, "mixlora": {"balance"}}
    assert aux_loss(model, breakdown=True).keys() == aux_terms.get(name, set())  # the terms are in the losses


def test_adapter_saved_under_fsdp_resumes_and_exports(sharded, tmp_path):
    results, folder = sharded
    model = build("ept")
    train(model, range(STEPS))
    resumed_losses, resumed_weights = results["resumed"]
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(train(model, range(STEPS, STEPS + 1))))
    for key, tensor in trained(model).items():
        torch.testing.assert_close(resumed_weights[key], tensor, rtol=RTOL, atol=ATOL, msg=key)

    saved = build("ept", adapter_dir=folder / "adapter").eval()
    for key, tensor in results["ept", False][1].items():
        torch.testing.assert_close(saved.get_parameter(key), tensor, rtol=0, atol=0, msg=key)
    batch, ids = halves(0)[0]
    export_lora(saved, 1, tmp_path / "lora")
    exported = PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "lora").eval()
    with torch.no_grad():
        routed = saved(**batch, task_ids=torch.ones_like(ids)).logits
        torch.testing.assert_close(exported(**batch).logits, routed, rtol=0, atol=1e-5)
