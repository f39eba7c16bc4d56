"""EPT against PEFT LoRA on one accelerator, at LLaMA-7B widths, random-init (nothing downloaded).

    python benchmarks/gpu.py [--device cuda] [--quick] [--out benchmarks/results/gpu.json]

Sized to finish well within 8 minutes on one H100 (not yet run on one: no accelerator was lent while it was
written); the result records the elapsed time. Every part times EPT and PEFT LoRA side by side, interleaved
round-robin after a warm-up, and reports medians and EPT / LoRA ratios measured in the same run:

1. Per layer, forward + backward (with the input gradient, as inside a network) at 4096 x 4096 and 4096 x 11008,
   8 x 512 tokens in bfloat16: LoRA r=8, EPT with one task for the batch and EPT with four tasks mixed in it.
2. Whole-model training step (forward, backward, AdamW) on a LLaMA-shaped model of a few 7B-width decoder layers
   (hidden 4096, FFN 11008, 32 heads) in bfloat16, q/k/v/o/up/down adapted, batch 4 x 512 of four tasks, EPT's
   contrastive loss included; the step's peak memory above what is resident before it (activations, gradients,
   optimizer temporaries), from the allocator's statistics.
3. Routed generation: greedy decoding of 4 prompts (four tasks) on the same model, tokens/s of EPT with task ids
   against unmerged LoRA and the bare base model.
4. The device-sensitive test subset, ``EPT_TEST_DEVICE=<device> pytest -m device``, its outcome recorded.

Adapters keep the dtype PEFT gives them on a bfloat16 base (float32, ``autocast_adapter_dtype``); the JSON records
it. ``--quick`` shrinks every width by 16 (the same 4096 : 11008 shape ratio), the model to two layers and
the rounds to two: with ``--device cpu`` it is the CI check that the benchmark still runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from common import interleaved, machine_info, markdown_table, ratio, summarize
from pyramid_peft import adapter_reads_task_ids, aux_loss
from speed import OneLinear, peft_config, randomize_ept, shared_copy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu.json"
NUM_TASKS = 4
MODEL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Plan:
    """Sizes and rounds of one mode."""

    mode: str
    hidden: int = 4096
    ffn: int = 11008
    heads: int = 32
    layers: int = 4
    vocab: int = 32000
    layer_tokens: tuple[int, int] = (8, 512)  # (examples, tokens each) of a layer input
    train_batch: tuple[int, int] = (4, 512)
    prompts: tuple[int, int] = (4, 64)  # (prompts, prompt tokens)
    new_tokens: int = 64
    layer_rounds: int = 20
    step_rounds: int = 5
    generate_rounds: int = 3
    warmup: int = 2

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return ((self.hidden, self.hidden), (self.hidden, self.ffn))


FULL = Plan("full")
QUICK = replace(
    FULL,
    mode="quick",
    hidden=256,
    ffn=688,
    heads=4,
    layers=2,
    vocab=1024,
    layer_tokens=(4, 32),
    train_batch=(4, 32),
    prompts=(4, 8),
    new_tokens=4,
    layer_rounds=2,
    step_rounds=2,
    generate_rounds=2,
    warmup=1,
)


# -- the device ----------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host timer measures it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def synced(step: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        step()
        synchronize(device)

    return run


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def memory_stats(device: torch.device) -> bool:
    """Whether the allocator reports peaks on ``device`` (CUDA, and other ``torch.accelerator`` devices)."""
    return device.type != "cpu" and hasattr(torch.accelerator, "max_memory_allocated")


def task_ids(rows: int, device: torch.device, mixed: bool = True) -> torch.Tensor:
    """One id per row: the four tasks in turn (``mixed``), else task 0 for every row."""
    ids = torch.arange(rows) % NUM_TASKS if mixed else torch.zeros(rows, dtype=torch.long)
    return ids.to(device)


def adapter_dtype(model: nn.Module) -> str:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return str(trainable[0].dtype).removeprefix("torch.") if trainable else "-"


def adapted(base: nn.Module, method: str, targets) -> nn.Module:
    """``base`` (its frozen weights shared, not copied) adapted with the benchmark's config of ``method``."""
    extra = {} if method == "lora" else {"num_tasks": NUM_TASKS}
    model = get_peft_model(shared_copy(base), peft_config(method, targets, lora_dropout=0.0, **extra))
    randomize_ept(model)  # EPT's zero-initialised kernels would make its experts unrealistically cheap
    return model


def routed(model: nn.Module, ids: torch.Tensor) -> dict:
    return {"task_ids": ids} if adapter_reads_task_ids(model) else {}


def timing(times) -> dict:
    return {"error": repr(times)} if isinstance(times, Exception) else summarize(times)


# -- 1. per layer --------------------------------------------------------------------------------------------------
def bench_layer(d_in: int, d_out: int, plan: Plan, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    base = OneLinear(d_in, d_out).to(device, dtype)
    models = {"lora": adapted(base, "lora", ["proj"]), "ept": adapted(base, "ept", ["proj"])}
    rows, tokens = plan.layer_tokens
    x = torch.randn(rows, tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(rows, tokens, d_out, device=device, dtype=dtype)

    def step(model: nn.Module, call: dict) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            x.grad = None
            model(x, **call).backward(grad)

        return synced(run, device)

    steps = {
        "lora": step(models["lora"], {}),
        "ept_one_task": step(models["ept"], {"task_ids": task_ids(rows, device, mixed=False)}),
        "ept_mixed_tasks": step(models["ept"], {"task_ids": task_ids(rows, device)}),
    }
    times = interleaved(steps, {name: plan.layer_rounds for name in steps}, plan.warmup)
    variants = {name: timing(times[name]) for name in steps}
    add_ratios(variants, "median")
    return {"d_in": d_in, "d_out": d_out, "tokens": rows * tokens, "variants": variants}


def add_ratios(rows: dict, key: str, reference: str = "lora", name: str = "vs_lora") -> None:
    """``rows[v][name]`` = ``rows[v][key] / rows[reference][key]``."""
    ref = rows[reference].get(key)
    for row in rows.values():
        row[name] = ratio(row.get(key), ref)


# -- 2 and 3. the LLaMA-shaped model -------------------------------------------------------------------------------
def llama(plan: Plan, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A random-init LLaMA with 7B widths (fewer layers), built in place on the device."""
    config = LlamaConfig(
        vocab_size=plan.vocab,
        hidden_size=plan.hidden,
        intermediate_size=plan.ffn,
        num_hidden_layers=plan.layers,
        num_attention_heads=plan.heads,
        num_key_value_heads=plan.heads,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.requires_grad_(False)


def train_step(model: nn.Module, batch: dict, ids: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        loss = model(**batch, **routed(model, ids)).loss + aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def step_peak_mib(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory of one ``step`` above what was allocated before it, in MiB (None where not reported)."""
    if not memory_stats(device):
        return None
    synchronize(device)
    torch.accelerator.reset_peak_memory_stats(device)
    before = torch.accelerator.memory_allocated(device)
    step()
    synchronize(device)
    return (torch.accelerator.max_memory_allocated(device) - before) / 2**20


def bench_model(plan: Plan, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    base = llama(plan, device, dtype)
    models = {name: adapted(base, name, MODEL_TARGETS).train() for name in ("lora", "ept")}
    rows, seq = plan.train_batch
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, plan.vocab, (rows, seq), generator=generator).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    steps = {name: synced(train_step(model, batch, task_ids(rows, device)), device) for name, model in models.items()}
    times = interleaved(steps, {name: plan.step_rounds for name in steps}, plan.warmup)
    training = {name: timing(times[name]) for name in steps}
    for name, step in steps.items():
        training[name]["step_peak_mib"] = step_peak_mib(step, device)
        training[name]["adapter_dtype"] = adapter_dtype(models[name])
        training[name]["trainable_params"] = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
    add_ratios(training, "median")
    add_ratios(training, "step_peak_mib", name="memory_vs_lora")
    return training, bench_generation(base, models, plan, device)


def bench_generation(base: nn.Module, models: dict, plan: Plan, device: torch.device) -> dict:
    prompts, length = plan.prompts
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, plan.vocab, (prompts, length), generator=generator).to(device)
    ids = task_ids(prompts, device)
    contenders = {"base": base, **models}

    def generate(model: nn.Module) -> Callable[[], None]:
        kwargs = dict(max_new_tokens=plan.new_tokens, min_new_tokens=plan.new_tokens, do_sample=False, pad_token_id=0)
        call = routed(model, ids) if model is not base else {}
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        return synced(lambda: model.generate(**inputs, **kwargs, **call), device)

    for model in contenders.values():
        model.eval()
    with torch.no_grad():
        times = interleaved(
            {name: generate(m) for name, m in contenders.items()},
            {name: plan.generate_rounds for name in contenders},
            warmup=1,
        )
    rows = {name: timing(times[name]) for name in contenders}
    for row in rows.values():
        row["tokens_per_s"] = prompts * plan.new_tokens / (row["median"] / 1e3) if "median" in row else None
    add_ratios(rows, "tokens_per_s")
    return {"prompts": prompts, "prompt_tokens": length, "new_tokens": plan.new_tokens, "variants": rows}


# -- 4. the device tests -------------------------------------------------------------------------------------------
def run_device_tests(device: torch.device, paths: list[str], select: str | None) -> dict:
    """``pytest -m device paths`` (optionally ``-k select``) with EPT_TEST_DEVICE set; its outcome and summary."""
    command = [sys.executable, "-m", "pytest", "-m", "device", "-q", "-p", "no:cacheprovider", *paths]
    if select:
        command += ["-k", select]
    env = {**os.environ, "EPT_TEST_DEVICE": str(device), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "command": f"EPT_TEST_DEVICE={device} python " + " ".join(command[1:]),
        "returncode": done.returncode,
        "summary": lines[-1] if lines else done.stderr[-500:],
        "seconds": time.perf_counter() - start,
    }


# -- report --------------------------------------------------------------------------------------------------------
def render(results: dict) -> str:
    parts = [f"# EPT / PEFT LoRA on {results['device_name']} ({results['dtype']}, {results['mode']})", ""]
    layer_rows = [
        [f"{r['d_in']}x{r['d_out']}", name, v.get("median"), v.get("vs_lora")]
        for r in results["layers"]
        for name, v in r["variants"].items()
    ]
    parts += ["## Per layer, forward + backward", markdown_table(["shape", "variant", "ms", "/ LoRA"], layer_rows)]
    train = results["training"]
    train_rows = [
        [name, v.get("median"), v.get("vs_lora"), v.get("step_peak_mib"), v.get("memory_vs_lora"), v["adapter_dtype"]]
        for name, v in train.items()
    ]
    headers = ["method", "step ms", "/ LoRA", "step peak MiB", "/ LoRA", "adapter dtype"]
    parts += ["", f"## Training step ({results['plan']['layers']} layers)", markdown_table(headers, train_rows)]
    gen = results["generation"]["variants"]
    gen_rows = [[name, v.get("tokens_per_s"), v.get("vs_lora")] for name, v in gen.items()]
    parts += ["", "## Routed generation", markdown_table(["model", "tokens/s", "/ LoRA"], gen_rows)]
    tests = results.get("device_tests")
    if tests:
        parts += ["", f"## Device tests\n`{tests['command']}`: {tests['summary']} (exit {tests['returncode']})"]
    parts += ["", f"Elapsed {results['seconds']:.0f} s."]
    return "\n".join(parts)


def run(plan: Plan, device: torch.device, dtype_name: str, tests: list[str], test_select: str | None) -> dict:
    start = time.perf_counter()
    gc.freeze()  # the timer collects garbage before each call: leave the libraries' objects out of it
    dtype = DTYPES[dtype_name]
    results = {
        "mode": plan.mode,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": dtype_name,
        "plan": asdict(plan),
        "machine": machine_info(),
        "layers": [bench_layer(d_in, d_out, plan, device, dtype) for d_in, d_out in plan.shapes],
    }
    results["training"], results["generation"] = bench_model(plan, device, dtype)
    if tests:
        results["device_tests"] = run_device_tests(device, tests, test_select)
    results["seconds"] = time.perf_counter() - start
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="widths / 16, two layers, two rounds (the CI check)")
    parser.add_argument("--no-tests", action="store_true", help="skip the device test subset")
    parser.add_argument("--tests-path", nargs="+", default=["tests"], help="where pytest looks (default tests)")
    parser.add_argument("--tests-select", default=None, help="pytest -k expression for the device test subset")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result (and a .md beside it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cpu" and not (
        torch.accelerator.is_available() and device.type == torch.accelerator.current_accelerator().type
    ):
        parser.error(f"--device {device}: torch sees no such device here; use --device cpu (with --quick) instead.")
    results = run(
        QUICK if args.quick else FULL, device, args.dtype, [] if args.no_tests else args.tests_path, args.tests_select
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    report = render(results)
    args.out.with_suffix(".md").write_text(report + "\n")
    print(report)
    return 1 if results.get("device_tests", {}).get("returncode") else 0


if __name__ == "__main__":
    sys.exit(main())
