"""Speed and memory of EPT against PEFT LoRA, the frozen base model and the peer methods (2 CPU threads).

    python benchmarks/speed.py [--quick] [--smoke] [--out benchmarks/results/speed.json]

Three parts, written as a Markdown table to stdout and to ``<out>.md``, and in full to ``<out>.json``:

1. Per layer (shapes d_in x d_out, 2048 tokens, one task id per example, top-2 of 8 experts): forward + backward
   time (with the input gradient, as inside a model) and the activation memory autograd saves, for the frozen
   base, PEFT LoRA r=8, EPT kron2d factored (a route over two kernel sizes, 2 and 8, and a same-size pair, 8 and
   8), EPT kron2d built literally (a ConvTranspose2d per expert producing the dense d_out x d_in matrix) and EPT
   code1d. Kernels are random, not the zero init, so every expert does real work.
2. Per model, one AdamW training step and its peak RSS: MiniLM (batch 32 x 64, every encoder linear) and SmolLM2
   (batch 8 x 128; q, k, v, o, up, down) for the frozen base, PEFT LoRA, EPT and every registered peer method.
   Batches are task-homogeneous, as in multi-task training.
3. Inference latency on MiniLM: the base model, routed EPT, and EPT merged for one task (``merge_for_task``).

Variants are timed interleaved round-robin (ABCABC...) after a warm-up, and reported as medians with their
spread, so ratios come from one run under the same machine load. Peak RSS is measured in a fresh subprocess per
method, so no method inherits another's memory. ``--quick`` (a few minutes) skips the 4096-wide shapes and SmolLM2
and takes fewer rounds; ``--smoke`` is a short check (one small shape, MiniLM at batch 8 x 32, base / LoRA / EPT,
2 rounds) run by CI. On a busy machine two threads per process can be far slower than one (each parallel op waits
for a descheduled thread): ``--threads 1`` then gives steadier ratios, and the JSON records the thread count.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from common import (
    interleaved,
    machine_info,
    markdown_table,
    peak_rss_mib,
    ratio,
    reset_peak_rss,
    rss_mib,
    saved_tensor_bytes,
    storage_pointers,
    summarize,
)
from pyramid_peft import adapter_reads_task_ids, aux_loss, make_peft_config, merge_for_task, method_names
from pyramid_peft.models import load_model, resolve_model

THREADS = 2
RANK = 8
DROPOUT = 0.1
KERNELS = [2, 2, 4, 4, 6, 6, 8, 8]
TASK = 0  # every example of every batch belongs to this task
BIG_LAYER = 4096 * 4096  # layers with at least this many weights get the plan's ``big`` round counts
ROUTES = {"2+8": (0, 6), "8+8": (6, 7)}  # expert indices into KERNELS: two kernel sizes, and a same-size pair
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "speed.json"
# Peak RSS is measured twice. With glibc's defaults, freed memory often stays in the heap (the mmap threshold grows
# as large blocks are freed), so RSS also records fragmentation: what a user sees, but allocation-order dependent.
# A fixed 128 KiB mmap threshold returns every large block to the OS on free, so RSS tracks live tensors.
ALLOCATORS = {"glibc_default": {}, "mmap_128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}

# Rank 8 and input dropout 0.1 wherever a method has them; everything else is the method's own default.
METHOD_SETTINGS: dict[str, dict] = {
    "lora": dict(r=RANK, lora_alpha=16, lora_dropout=DROPOUT),
    "ept": dict(r=RANK, lora_dropout=DROPOUT, kernel_sizes=KERNELS, top_k=2),
    "hydralora": dict(r=RANK, lora_dropout=DROPOUT),
    "mixlora": dict(r=RANK, lora_dropout=DROPOUT, target_modules=None),  # LoRA on attention, mixtures on FFNs
    "moelora": dict(r=RANK, lora_dropout=DROPOUT),  # total rank 8 split over its 8 experts
    "more": dict(r=RANK, lora_dropout=DROPOUT),
    "multilora": dict(r=RANK, lora_dropout=DROPOUT),
    "tucka": dict(r=RANK),
}

MINILM_TARGETS = r"encoder\.layer\.\d+\..*\.(query|key|value|dense)"  # the 36 encoder linears, not the pooler
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelCase:
    """A model benchmark: the model alias, the training batch, the adapted modules and the timed rounds."""

    alias: str
    batch: int
    seq: int
    targets: list[str] | str
    rounds: int


@dataclass(frozen=True)
class Plan:
    """What one mode of the command measures, and how many timed rounds each part gets."""

    mode: str
    shapes: tuple[tuple[int, int], ...]
    tokens: int
    layer_rounds: int
    big_rounds: int  # layers with >= BIG_LAYER weights
    literal_big_rounds: int  # the literal form on those layers (seconds per step)
    models: tuple[ModelCase, ...]
    methods: tuple[str, ...] | None  # None: base and every registered method
    inference_model: str | None
    inference_rounds: int
    rss_steps: int
    warmup: int = 1
    layer_batch: int = 8  # examples per layer input (the tokens are split evenly among them)


MINILM = ModelCase("minilm-l6", 32, 64, MINILM_TARGETS, rounds=7)
SMOLLM2 = ModelCase("smollm2-135m", 8, 128, SMOLLM2_TARGETS, rounds=3)
ALL_SHAPES = ((768, 768), (768, 3072), (4096, 4096), (4096, 11008))

PLANS = {
    "full": Plan(
        mode="full",
        shapes=ALL_SHAPES,
        tokens=2048,
        layer_rounds=15,
        big_rounds=5,
        literal_big_rounds=3,
        models=(MINILM, SMOLLM2),
        methods=None,
        inference_model="minilm-l6",
        inference_rounds=21,
        rss_steps=3,
    ),
    "quick": Plan(
        mode="quick",
        shapes=ALL_SHAPES[:2],
        tokens=2048,
        layer_rounds=7,
        big_rounds=3,
        literal_big_rounds=2,
        models=(replace(MINILM, rounds=3),),
        methods=None,
        inference_model="minilm-l6",
        inference_rounds=9,
        rss_steps=1,
    ),
    "smoke": Plan(
        mode="smoke",
        shapes=((768, 768),),
        tokens=512,
        layer_rounds=2,
        big_rounds=2,
        literal_big_rounds=2,
        models=(replace(MINILM, batch=8, seq=32, rounds=2),),
        methods=("base", "lora", "ept"),
        inference_model="minilm-l6",
        inference_rounds=2,
        rss_steps=1,
    ),
}


# -- building ------------------------------------------------------------------------------------------------------
def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose modules are new but whose (frozen) parameters are the very same tensors."""
    return copy.deepcopy(model, {id(p): p for p in model.parameters()})


def peft_config(method: str, targets, **overrides):
    """The benchmark's config of ``method`` (METHOD_SETTINGS; rank 8 for a method added since) on ``targets``."""
    settings = {"target_modules": targets, **METHOD_SETTINGS.get(method, {"r": RANK}), **overrides}
    return make_peft_config(method, **settings)


def methods_to_run(plan: Plan) -> list[str]:
    """``base`` and every registered method (or the plan's subset); expected methods that are missing are noted."""
    registered = method_names()
    for name in METHOD_SETTINGS:
        if name not in registered:
            print(f"note: method {name!r} is not registered in pyramid_peft yet; skipped", file=sys.stderr)
    names = ["base", *registered]
    return [n for n in names if plan.methods is None or n in plan.methods]


def ept_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "ept_kernels")]


def randomize_ept(model: nn.Module, seed: int = 0) -> None:
    """Random kernels in every EPT layer: the zero init would make the experts' arithmetic unrealistically cheap."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ept_layers(model):
            for kernels in layer.ept_kernels.values():
                kernels.copy_(torch.randn(kernels.shape, generator=generator))


def ept_fused_rank(model: nn.Module) -> float | None:
    """Mean rank of EPT's fused factors for TASK over the model's layers: r times the sum of the distinct kernel
    sizes the task's route picks (2+8 gives 80, 8+8 gives 64 at r=8). None for other methods."""
    ranks = []
    with torch.no_grad():
        for layer in ept_layers(model):
            for adapter, config in layer.ept_config.items():
                weights = layer.task_weights(adapter)[TASK].tolist()
                ranks.append(config.r * sum({k for k, w in zip(config.kernel_sizes, weights) if w}))
    return sum(ranks) / len(ranks) if ranks else None


def force_route(layer: nn.Module, experts: tuple[int, ...]) -> None:
    """Make every task pick ``experts`` (with near-equal weights): their gate bias dominates the logits."""
    with torch.no_grad():
        for gate in layer.ept_gate.values():
            gate.weight.normal_(std=0.01)
            gate.bias.fill_(-10.0)
            gate.bias[list(experts)] = 10.0


def task_kwargs(model: nn.Module, batch: int) -> dict:
    """``task_ids`` (one per example, all the same task) for this package's methods; nothing for others."""
    return {"task_ids": torch.full((batch,), TASK, dtype=torch.long)} if adapter_reads_task_ids(model) else {}


# -- 1. per layer --------------------------------------------------------------------------------------------------
class OneLinear(nn.Module):
    """The smallest model PEFT can adapt: one frozen linear named ``proj``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def layer_variants(d_in: int, d_out: int) -> dict[str, nn.Module]:
    """The per-layer contenders, sharing one frozen weight, in training mode."""
    torch.manual_seed(0)
    base = OneLinear(d_in, d_out)
    variants = {"base": base, "lora": get_peft_model(shared_copy(base), peft_config("lora", ["proj"]))}
    forms = {
        "ept_kron2d_2+8": ("2+8", {}),
        "ept_kron2d_8+8": ("8+8", {}),
        "ept_literal_2+8": ("2+8", {"materialize": True}),
        "ept_code1d_2+8": ("2+8", {"expert_form": "code1d"}),
    }
    for name, (route, overrides) in forms.items():
        model = get_peft_model(shared_copy(base), peft_config("ept", ["proj"], **overrides))
        randomize_ept(model)
        force_route(model.base_model.model.proj, ROUTES[route])
        variants[name] = model
    return {name: model.train() for name, model in variants.items()}


def layer_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``model`` on ``x`` (which needs its gradient, as inside a network)."""
    kwargs = task_kwargs(model, x.shape[0])

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x, **kwargs).backward(grad)

    return step


def saved_mib(model: nn.Module, x: torch.Tensor) -> float:
    """Activation memory (MiB) one forward pass of ``model`` saves for backward, parameters not counted."""
    kwargs = task_kwargs(model, x.shape[0])
    _, nbytes = saved_tensor_bytes(lambda: model(x, **kwargs), storage_pointers(model))
    return nbytes / 2**20


def bench_layer(d_in: int, d_out: int, plan: Plan) -> dict:
    """Time and activation memory of every variant on one shape."""
    variants = layer_variants(d_in, d_out)
    generator = torch.Generator().manual_seed(1)
    shape = (plan.layer_batch, plan.tokens // plan.layer_batch)
    x = torch.randn(*shape, d_in, generator=generator).requires_grad_(True)
    grad = torch.randn(*shape, d_out, generator=generator)
    big = d_in * d_out >= BIG_LAYER
    rounds = {name: plan.big_rounds if big else plan.layer_rounds for name in variants}
    if big:
        rounds["ept_literal_2+8"] = plan.literal_big_rounds
    steps = {name: layer_step(model, x, grad) for name, model in variants.items()}
    times = interleaved(steps, rounds, plan.warmup)
    rows = {name: timing_entry(times[name]) for name in variants}
    for name, model in variants.items():
        if "error" not in rows[name]:
            rows[name]["saved_mib"] = saved_mib(model, x)
    add_ratios(rows)
    gain = literal_gain(rows)
    return {"d_in": d_in, "d_out": d_out, "tokens": plan.tokens, "variants": rows, "literal_vs_factored": gain}


def literal_gain(rows: dict) -> dict:
    """How much faster the factored kron2d layer is than the literal one: whole layer, and adapter overhead only."""
    base, factored, literal = (rows[n].get("median") for n in ("base", "ept_kron2d_2+8", "ept_literal_2+8"))
    if None in (base, factored, literal):
        return {}
    overhead = (literal - base) / (factored - base) if factored > base else None
    return {"layer": literal / factored, "overhead": overhead}


# -- 2. per model: training step and peak RSS ----------------------------------------------------------------------
def load_case(case: ModelCase) -> tuple[nn.Module, str]:
    """The pretrained model of ``case`` (frozen, float32) and its family."""
    resolved = resolve_model(case.alias)
    model = load_model(resolved).requires_grad_(False)
    return model, resolved.family


def make_batch(case: ModelCase, family: str, vocab: int) -> tuple[dict, torch.Tensor | None]:
    """Fixed random tokens: the model inputs (with LM labels for causal models) and the classifier labels."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (case.batch, case.seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "causal":
        return {**inputs, "labels": ids}, None
    return inputs, torch.randint(2, (case.batch,), generator=generator)


def build_adapted(base: nn.Module, method: str, case: ModelCase) -> nn.Module:
    """``base`` (its weights shared) adapted with ``method``; for ``"base"`` the frozen model itself, whose
    backward pass then runs down to the embeddings, the floor every adapter pays."""
    model = shared_copy(base)
    if method == "base":
        model.enable_input_require_grads()
        return model
    return get_peft_model(model, peft_config(method, case.targets))


def train_step(model: nn.Module, family: str, case: ModelCase) -> Callable[[], None]:
    """One AdamW step on a fixed batch: the LM loss, or for encoders a 2-way classifier on position 0, plus the
    method's auxiliary loss (EPT's contrastive term, MixLoRA's balance term)."""
    inputs, labels = make_batch(case, family, model.config.vocab_size)
    head = nn.Linear(model.config.hidden_size, 2) if labels is not None else None
    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    kwargs = task_kwargs(model, case.batch)
    model.train()

    def step() -> None:
        out = model(**inputs, **kwargs)
        loss = out.loss if head is None else F.cross_entropy(head(out.last_hidden_state[:, 0]), labels)
        if kwargs:
            loss = loss + aux_loss(model)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def prepare_training(base: nn.Module, family: str, case: ModelCase, method: str) -> tuple[Callable, float | None]:
    """The training step of ``method`` on ``case``, and EPT's fused rank (None for other methods)."""
    model = build_adapted(base, method, case)
    return train_step(model, family, case), ept_fused_rank(model)


def bench_training(base: nn.Module, family: str, case: ModelCase, plan: Plan, methods: list[str]) -> dict:
    """Interleaved training-step times of every method on one model, then each method's peak RSS."""
    steps, rows, fused_rank = {}, {}, None
    for method in methods:
        try:
            steps[method], rank = prepare_training(base, family, case, method)
        except Exception as err:  # noqa: BLE001 - a method that cannot be built is reported, the others go on
            rows[method] = {"error": describe(err)}
            continue
        fused_rank = rank if rank is not None else fused_rank
    times = interleaved(steps, {m: case.rounds for m in steps}, plan.warmup)
    rows = {method: rows.get(method) or timing_entry(times[method], unit="s") for method in methods}
    steps.clear()
    add_ratios(rows)
    for method in methods:
        if "error" not in rows[method]:
            rows[method]["rss"] = {
                name: rss_in_subprocess(case.alias, method, plan.mode, env) for name, env in ALLOCATORS.items()
            }
    add_rss_ratios(rows)
    return {
        "batch": case.batch,
        "seq": case.seq,
        "targets": case.targets,
        "ept_fused_rank": fused_rank,
        "methods": rows,
    }


def rss_in_subprocess(alias: str, method: str, mode: str, env: dict[str, str]) -> dict:
    """Peak RSS of ``method`` training on ``alias``, measured in a fresh interpreter with ``env`` added."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-child",
        alias,
        method,
        "--mode",
        mode,
        "--threads",
        str(torch.get_num_threads()),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def rss_child(alias: str, method: str, mode: str) -> None:
    """(In the subprocess.) Load and adapt the model, then train ``plan.rss_steps`` steps; print the RSS once
    loaded and the peak RSS while training (the peak is reset after loading where Linux allows, so that loading's
    transient memory does not count; ``peak_reset`` says whether it was)."""
    plan = PLANS[mode]
    case = next(c for c in plan.models if c.alias == alias)
    base, family = load_case(case)
    step = train_step(build_adapted(base, method, case), family, case)
    gc.collect()
    reset = reset_peak_rss()
    loaded = rss_mib() if reset else peak_rss_mib()
    for _ in range(plan.rss_steps):
        step()
    print(json.dumps({"loaded_mib": loaded, "peak_mib": peak_rss_mib(), "peak_reset": reset, "steps": plan.rss_steps}))


# -- 3. inference --------------------------------------------------------------------------------------------------
def bench_inference(base: nn.Module, family: str, case: ModelCase, plan: Plan) -> dict:
    """Eval-mode forward latency (batch as in training) of the base model, routed EPT and EPT merged for TASK."""
    ept = build_adapted(base, "ept", case)
    randomize_ept(ept)
    ept.eval()
    models = {"base": base.eval(), "ept_routed": ept, "ept_merged": merge_for_task(ept, TASK).eval()}
    inputs, _ = make_batch(case, family, base.config.vocab_size)
    inputs.pop("labels", None)

    def forward(model: nn.Module) -> Callable[[], None]:
        kwargs = task_kwargs(model, case.batch)
        return torch.no_grad()(lambda: model(**inputs, **kwargs))

    steps = {name: forward(model) for name, model in models.items()}
    times = interleaved(steps, {name: plan.inference_rounds for name in models}, plan.warmup)
    rows = {name: timing_entry(times[name]) for name in models}
    add_ratios(rows, reference=None)
    return {"model": case.alias, "batch": case.batch, "seq": case.seq, "variants": rows}


# -- results -------------------------------------------------------------------------------------------------------
def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def timing_entry(times, unit: str = "ms") -> dict:
    """Summary of a list of timings in ``unit``, or the error that stopped the variant."""
    return {"error": describe(times)} if isinstance(times, Exception) else summarize(times, unit)


def add_ratios(rows: dict, reference: str | None = "lora") -> None:
    """Each row's median over the base's (and over ``reference``'s, where there is one)."""
    for row in rows.values():
        row["vs_base"] = ratio(row.get("median"), rows.get("base", {}).get("median"))
        if reference is not None:
            row[f"vs_{reference}"] = ratio(row.get("median"), rows.get(reference, {}).get("median"))


def add_rss_ratios(rows: dict) -> None:
    """Per allocator setting: the memory training adds after loading, and both it and the peak relative to LoRA's."""
    for allocator in ALLOCATORS:
        entries = [row.get("rss", {}).get(allocator, {}) for row in rows.values()]
        measured = [rss for rss in entries if "peak_mib" in rss]
        for rss in measured:
            rss["training_mib"] = rss["peak_mib"] - rss["loaded_mib"]
        lora = rows.get("lora", {}).get("rss", {}).get(allocator, {})
        for rss in measured:
            rss["peak_vs_lora"] = ratio(rss["peak_mib"], lora.get("peak_mib"))
            rss["training_vs_lora"] = ratio(rss["training_mib"], lora.get("training_mib"))


def target(value: float | None, op: str, bound: float) -> dict:
    met = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return {"value": value, "target": f"{op} {bound}", "met": met}


def check_targets(results: dict) -> dict:
    """The issue's targets, as measured (``met`` is None where the run did not measure them)."""
    checks = {}
    for alias, model in results["models"].items():
        ept = model.get("methods", {}).get("ept", {})
        checks[f"{alias}: EPT step / LoRA step"] = target(ept.get("vs_lora"), "<=", 1.2)
        for allocator in ALLOCATORS:
            peak = ept.get("rss", {}).get(allocator, {}).get("peak_vs_lora")
            checks[f"{alias}: EPT peak RSS / LoRA peak RSS ({allocator})"] = target(peak, "<=", 1.1)
    for layer in results["layers"]:
        if layer["d_in"] * layer["d_out"] >= BIG_LAYER:
            gain = layer["literal_vs_factored"]
            name = f"{layer['d_in']}x{layer['d_out']}: literal / factored"
            checks[f"{name} (layer)"] = target(gain.get("layer"), ">=", 10)
            checks[f"{name} (adapter overhead)"] = target(gain.get("overhead"), ">=", 10)
    merged = results["inference"].get("variants", {}).get("ept_merged", {})
    checks["inference: merged EPT / base"] = target(merged.get("vs_base"), "<=", 1.02)
    return checks


def render(results: dict) -> str:
    """The Markdown report: machine, per-layer table, per-model table, inference table, targets."""
    m = results["machine"]
    parts = [
        f"# Speed ({results['mode']})",
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}, transformers "
        f"{m['transformers']}, peft {m['peft']}; {m['date']}; load average {m['load_average_at_start'][0]:.1f} at "
        f"start, {m['load_average_at_end'][0]:.1f} at end. Medians (min-max) of interleaved rounds.",
        "## Per layer: forward + backward, top-2 of 8 experts",
        markdown_table(
            ["shape", "tokens", "variant", "ms", "min-max", "x base", "x LoRA", "saved MiB"],
            [
                [f"{layer['d_in']}x{layer['d_out']}", layer["tokens"], name, *timing_cells(v), v.get("saved_mib")]
                for layer in results["layers"]
                for name, v in layer["variants"].items()
            ],
        ),
        markdown_table(
            ["shape", "literal / factored (layer)", "literal / factored (adapter overhead)"],
            [
                [
                    f"{layer['d_in']}x{layer['d_out']}",
                    *(layer["literal_vs_factored"].get(key) for key in ("layer", "overhead")),
                ]
                for layer in results["layers"]
            ],
        ),
    ]
    for alias, model in results["models"].items():
        parts.append(f"## {alias}: one AdamW step, batch {model.get('batch')} x {model.get('seq')}")
        if "error" in model:
            parts.append(f"error: {model['error']}")
            continue
        if model["ept_fused_rank"] is not None:
            parts.append(
                f"EPT's route for the task fuses its experts into factors of mean rank {model['ept_fused_rank']:.0f}."
            )
        parts.append(
            markdown_table(
                ["method", "s", "min-max", "x base", "x LoRA"]
                + [
                    f"{label} MiB, {allocator} (x LoRA)"
                    for allocator in ALLOCATORS
                    for label in ("peak RSS", "training")
                ],
                [[name, *timing_cells(v), *rss_cells(v.get("rss", {}))] for name, v in model["methods"].items()],
            )
        )
    if results["inference"]:
        inference = results["inference"]
        parts.append(f"## Inference: {inference['model']}, batch {inference['batch']} x {inference['seq']}, eval")
        parts.append(
            markdown_table(
                ["variant", "ms", "min-max", "x base"],
                [[name, *timing_cells(v)[:3]] for name, v in inference["variants"].items()],
            )
        )
    parts.append("## Targets")
    parts.append(
        markdown_table(
            ["target", "measured", "goal", "met"],
            [[name, t["value"], t["target"], t["met"]] for name, t in results["targets"].items()],
        )
    )
    return "\n\n".join(parts) + "\n"


def timing_cells(row: dict) -> list:
    if "error" in row:
        return [row["error"], None, None, None]
    return [row["median"], f"{row['min']:.3g}-{row['max']:.3g}", row["vs_base"], row.get("vs_lora")]


def rss_cells(rss: dict) -> list:
    """Per allocator setting: "peak (x LoRA)" and "training (x LoRA)", or the child's error."""
    cells = []
    for allocator in ALLOCATORS:
        entry = rss.get(allocator, {})
        if "peak_mib" not in entry:
            cells += [entry.get("error"), None]
            continue
        for key in ("peak", "training"):
            mib, share = entry[f"{key}_mib"], entry[f"{key}_vs_lora"]
            cells.append(f"{mib:.0f} ({share:.2f})" if share is not None else f"{mib:.0f}")
    return cells


# -- command -------------------------------------------------------------------------------------------------------
def run(plan: Plan) -> dict:
    """Every part of ``plan``; a model that fails to load is recorded and the run goes on."""
    results = {
        "mode": plan.mode,
        "machine": machine_info(),
        "plan": asdict(plan),
        "layers": [],
        "models": {},
        "inference": {},
    }
    for d_in, d_out in plan.shapes:
        print(f"layer {d_in}x{d_out} ...", file=sys.stderr, flush=True)
        results["layers"].append(bench_layer(d_in, d_out, plan))
    methods = methods_to_run(plan)
    for case in plan.models:
        print(f"model {case.alias} ...", file=sys.stderr, flush=True)
        try:
            base, family = load_case(case)
        except Exception as err:  # noqa: BLE001 - e.g. the model's wheel is not installed
            results["models"][case.alias] = {"error": describe(err)}
            continue
        results["models"][case.alias] = bench_training(base, family, case, plan, methods)
        if case.alias == plan.inference_model:
            results["inference"] = bench_inference(base, family, case, plan)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["targets"] = check_targets(results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 4096-wide layers and SmolLM2; fewer rounds")
    parser.add_argument("--smoke", action="store_true", help="a short check (CI): one shape, MiniLM, base/LoRA/EPT")
    parser.add_argument("--out", type=Path, help=f"JSON result path (default {DEFAULT_OUT}; a temp file for --smoke)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    parser.add_argument("--rss-child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(PLANS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(*args.rss_child, args.mode)
        return
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    out = args.out or (Path(tempfile.mkdtemp(prefix="speed-")) / "speed.json" if args.smoke else DEFAULT_OUT)
    results = run(plan)
    report = render(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(report)
    print(report)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
