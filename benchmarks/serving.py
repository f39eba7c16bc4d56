"""Serving speed of routed EPT against PEFT LoRA where users serve several tasks from one model (CPU, one thread).

    python benchmarks/serving.py [--smoke] [--out benchmarks/results/serving.json]

Six measurements, each side by side in one run (interleaved round-robin after a warm-up, medians):

1. Mixed-task batch, forward only: SmolLM2-135M, 32 rows x 64 tokens from 8 tasks (4 rows each). EPT routes the
   8 tasks in one adapter; PEFT LoRA serves 8 adapters through ``adapter_names`` (its mixed-batch path); one LoRA
   for every row is the floor. Target: EPT / multi-LoRA <= 1.0 (median of 5 rounds). Beside it, multi-LoRA at
   EPT's per-task rank (r times the kernel sizes of a task's experts, the products EPT's rows-by-task path
   runs) shows how much of the gap is that rank rather than the routing.
2. Routed generation: 4 prompts of 16 tokens, 32 new tokens each, greedy; EPT with one task per prompt against
   PEFT LoRA unmerged (tokens/s). Target: EPT / LoRA >= 0.85 (median of 3 rounds).
3. Training step on MiniLM-L6 (batch 32 x 64, the 36 encoder linears; ``speed.py``'s step): EPT / LoRA, the
   median of 6 paired steps (each pair run back to back). Target: <= 1.20.
4. The two ways EPT applies a kron2d group's shared down factor ``A ⊗ I_k`` to a task's rows without autograd
   (``experts.KronDown``): one product with the factor, or the dilated convolution, at SmolLM2's input widths,
   for a few and for many tokens; beside each, the way ``experts.dilated_pays`` picks (the rule's check).
5. Single requests, forward only (latency, where a call's fixed costs show): one row of 16 tokens for one task
   (EPT routed against PEFT LoRA unmerged, and the base model) and two rows for two tasks (EPT against PEFT
   multi-LoRA through ``adapter_names``). Reported, no target (median of 15 rounds).
6. The two ways to apply a kron2d group's shared up factor ``B ⊗ I_k`` to a task's mixed hidden states: the dense
   product (r k multiply-adds per output, what EPT runs), or the Kronecker form, one product with B (r per output)
   whose result comes out de-interleaved (row p m + i instead of i k + p) and is added back interleaved; the
   product alone is timed beside it, so the cost of the interleaving shows.

Adapters have rank 8 (EPT: kernels 2, 2, 4, 4, 6, 6, 8, 8, top-2) on q, k, v, o, up and down; their weights are
randomised (not the zero init) and every task routes differently, so every expert group does real work.
``--smoke`` (CI) runs every part at toy sizes to keep the script working.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from common import interleaved, machine_info, markdown_table, summarize, write_results
from pyramid_peft import EptConfig
from pyramid_peft.methods.ept import experts
from speed import KERNELS, MINILM, RANK, SMOLLM2, SMOLLM2_TARGETS, build_adapted, load_case, shared_copy, train_step

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "serving.json"
TASKS = 8
DOWN_WIDTHS, DOWN_TOKENS, DOWN_CALLS = (576, 1536), (32, 256), 20  # SmolLM2's input widths; a task's tokens
UP_WIDTHS, UP_TOKENS = (576, 1536), 256  # SmolLM2's output widths (q, o, down; up); a task's tokens in part 1


@dataclass(frozen=True)
class Plan:
    mode: str
    batch_rows: int  # mixed-task batch: rows (an equal share per task) and tokens per row
    batch_tokens: int
    batch_rounds: int
    prompts: int  # generation
    prompt_tokens: int
    new_tokens: int
    generation_rounds: int
    train_batch: int  # MiniLM training step
    train_seq: int
    train_pairs: int
    down_rounds: int  # the down factor's two forms: rounds of DOWN_CALLS calls each
    request_tokens: int  # single requests: tokens per row, and rounds
    request_rounds: int
    warmup: int = 1


PLANS = {
    "full": Plan("full", 32, 64, 5, 4, 16, 32, 3, 32, 64, 6, 7, 16, 15),
    "smoke": Plan("smoke", 8, 8, 1, 2, 4, 3, 1, 4, 16, 1, 1, 4, 1),
}


# -- building ------------------------------------------------------------------------------------------------------
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every adapter weight off its init (B = 0 would make every adapter a no-op): N(0, 0.02²) noise on
    the factors, unit-scale kernels and task embeddings, so each task picks its own experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            scale = 1.0 if ("ept_kernels" in name or "task_embedding" in name or "ept_gate" in name) else 0.02
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def ept_model(base: torch.nn.Module) -> torch.nn.Module:
    config = EptConfig(
        target_modules=SMOLLM2_TARGETS, r=RANK, kernel_sizes=KERNELS, top_k=2, num_tasks=TASKS, lora_dropout=0.0
    )
    model = get_peft_model(shared_copy(base), config)
    randomize(model)
    return model.eval()


def lora_model(base: torch.nn.Module, adapters: int, rank: int = RANK) -> torch.nn.Module:
    """PEFT LoRA (r=8 unless given) with ``adapters`` adapters named task0, task1, ... (randomised)."""
    config = LoraConfig(target_modules=SMOLLM2_TARGETS, r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
    model = get_peft_model(shared_copy(base), config, adapter_name="task0")
    for task in range(1, adapters):
        model.add_adapter(f"task{task}", config)
    randomize(model)
    return model.eval()


def pyramid_usage(model: torch.nn.Module) -> tuple[float, float]:
    """Means over EPT's layers of the kernel sizes some task uses (how much of the pyramid is live) and, over
    layers and tasks, of a task's rank as one LoRA: r times the kernel sizes of its top-k experts' groups."""
    sizes, ranks = [], []
    with torch.no_grad():
        for layer in (m for m in model.modules() if hasattr(m, "ept_config")):
            config = layer.ept_config["default"]
            for task_used in (layer.task_weights("default") != 0).tolist():
                ranks.append(config.r * sum({k for k, u in zip(config.kernel_sizes, task_used) if u}))
            used = (layer.task_weights("default") != 0).any(dim=0).tolist()
            sizes.append(len({k for k, u in zip(config.kernel_sizes, used) if u}))
    return sum(sizes) / len(sizes), sum(ranks) / len(ranks)


def forward_step(model: torch.nn.Module, inputs: dict, **kwargs):
    """A timed step: one forward of ``model`` on ``inputs`` without autograd."""

    def step():
        with torch.no_grad():
            model(**inputs, **kwargs)

    return step


# -- 1. mixed-task batch -------------------------------------------------------------------------------------------
def bench_mixed_batch(base: torch.nn.Module, plan: Plan) -> dict:
    per_task = plan.batch_rows // TASKS
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(base.config.vocab_size, (plan.batch_rows, plan.batch_tokens), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tasks = torch.arange(TASKS).repeat_interleave(per_task)
    ept, multi, single = ept_model(base), lora_model(base, TASKS), lora_model(base, 1)
    groups_used, task_rank = pyramid_usage(ept)
    matched = lora_model(base, TASKS, rank=round(task_rank))
    names = [f"task{t}" for t in tasks.tolist()]
    forward = partial(forward_step, inputs=inputs)
    steps = {
        "ept_routed": forward(ept, task_ids=tasks),
        "lora_multi_adapter_names": forward(multi, adapter_names=names),
        "lora_single": forward(single),
        "lora_multi_adapter_names_rank_matched": forward(matched, adapter_names=names),
    }
    times = interleaved(steps, {name: plan.batch_rounds for name in steps}, plan.warmup)
    rows = {name: summarize(times[name], unit="s") for name in steps}
    return {
        "rows": plan.batch_rows,
        "tokens": plan.batch_tokens,
        "tasks": TASKS,
        "ept_groups_used_per_layer": groups_used,
        "ept_task_rank": task_rank,
        "rank_matched_lora_r": round(task_rank),
        "variants": rows,
        "ept_vs_multi_lora": rows["ept_routed"]["median"] / rows["lora_multi_adapter_names"]["median"],
        "ept_vs_rank_matched_multi_lora": rows["ept_routed"]["median"]
        / rows["lora_multi_adapter_names_rank_matched"]["median"],
    }


# -- 2. routed generation ------------------------------------------------------------------------------------------
def bench_generation(base: torch.nn.Module, plan: Plan) -> dict:
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(base.config.vocab_size, (plan.prompts, plan.prompt_tokens), generator=generator)
    settings = dict(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=plan.new_tokens,
        min_new_tokens=plan.new_tokens,
        do_sample=False,
        pad_token_id=base.config.eos_token_id,
    )
    ept, lora = ept_model(base), lora_model(base, 1)
    tasks = torch.arange(plan.prompts) % TASKS

    def generate(model, **kwargs):
        def step():
            with torch.no_grad():
                out = model.generate(**settings, **kwargs)
            assert out.shape[1] == plan.prompt_tokens + plan.new_tokens

        return step

    steps = {"ept_routed": generate(ept, task_ids=tasks), "lora_unmerged": generate(lora), "base": generate(base)}
    times = interleaved(steps, {name: plan.generation_rounds for name in steps}, plan.warmup)
    tokens = plan.prompts * plan.new_tokens
    rows = {}
    for name in steps:
        rows[name] = summarize(times[name], unit="s")
        rows[name]["tokens_per_s"] = tokens / statistics.median(times[name])
    return {
        "prompts": plan.prompts,
        "prompt_tokens": plan.prompt_tokens,
        "new_tokens": plan.new_tokens,
        "variants": rows,
        "ept_vs_lora_tokens_per_s": rows["ept_routed"]["tokens_per_s"] / rows["lora_unmerged"]["tokens_per_s"],
    }


# -- 3. MiniLM training step ---------------------------------------------------------------------------------------
def bench_training(plan: Plan) -> dict:
    case = replace(MINILM, batch=plan.train_batch, seq=plan.train_seq)
    base, family = load_case(case)
    steps = {method: train_step(build_adapted(base, method, case), family, case) for method in ("lora", "ept")}
    times = interleaved(steps, {name: plan.train_pairs for name in steps}, plan.warmup)
    pairs = [e / lo for e, lo in zip(times["ept"], times["lora"])]
    return {
        "batch": case.batch,
        "seq": case.seq,
        "variants": {name: summarize(times[name], unit="s") for name in steps},
        "paired_ratios": pairs,
        "ept_vs_lora": statistics.median(pairs),
    }


# -- 4. the down factor's two forms --------------------------------------------------------------------------------
def bench_down_forms(plan: Plan) -> dict:
    rows = []
    generator = torch.Generator().manual_seed(2)
    for d_in in DOWN_WIDTHS:
        for k in sorted(set(KERNELS)):
            A = torch.randn(RANK, experts.seed_shape(d_in, d_in, k, "kron2d")[1], generator=generator)
            factor = experts.kron2d_down(A, k, d_in)
            for tokens in DOWN_TOKENS:
                x = torch.randn(tokens, d_in, generator=generator)
                forms = {
                    "product": partial(F.linear, x, factor),
                    "convolution": partial(experts.dilated_down, x, A, k, d_in),
                }
                steps = {name: repeated(form) for name, form in forms.items()}
                with torch.no_grad():
                    times = interleaved(steps, {name: plan.down_rounds for name in steps}, plan.warmup)
                micros = {name: statistics.median(times[name]) / DOWN_CALLS * 1e6 for name in steps}
                rule = "convolution" if experts.dilated_pays(tokens, d_in, RANK, k) else "product"
                faster = min(micros, key=micros.get)
                rows.append({"d_in": d_in, "k": k, "tokens": tokens, **micros, "rule": rule, "faster": faster})
    return {"calls_per_round": DOWN_CALLS, "rows": rows, "rule_agrees": sum(r["rule"] == r["faster"] for r in rows)}


def repeated(form):
    def step():
        for _ in range(DOWN_CALLS):
            form()

    return step


# -- 5. single requests ----------------------------------------------------------------------------------------
def bench_requests(base: torch.nn.Module, plan: Plan) -> dict:
    generator = torch.Generator().manual_seed(3)
    ept, lora, multi = ept_model(base), lora_model(base, 1), lora_model(base, TASKS)

    def request(rows: int):
        ids = torch.randint(base.config.vocab_size, (rows, plan.request_tokens), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    one, two = request(1), request(2)
    steps = {
        "one_task_ept_routed": forward_step(ept, one, task_ids=torch.tensor([3])),
        "one_task_lora_unmerged": forward_step(lora, one),
        "one_task_base": forward_step(base, one),
        "two_tasks_ept_routed": forward_step(ept, two, task_ids=torch.tensor([3, 5])),
        "two_tasks_lora_multi_adapter_names": forward_step(multi, two, adapter_names=["task3", "task5"]),
    }
    times = interleaved(steps, {name: plan.request_rounds for name in steps}, plan.warmup)
    rows = {name: summarize(times[name], unit="s") for name in steps}
    return {
        "tokens": plan.request_tokens,
        "variants": rows,
        "one_task_ept_vs_lora": rows["one_task_ept_routed"]["median"] / rows["one_task_lora_unmerged"]["median"],
        "two_tasks_ept_vs_multi_lora": rows["two_tasks_ept_routed"]["median"]
        / rows["two_tasks_lora_multi_adapter_names"]["median"],
    }


# -- 6. the up factor's two forms ----------------------------------------------------------------------------------
def bench_up_forms(plan: Plan) -> dict:
    rows = []
    generator = torch.Generator().manual_seed(4)
    tokens = UP_TOKENS
    for d_out in UP_WIDTHS:
        for k in sorted(set(KERNELS)):
            m = d_out // k  # SmolLM2's widths are multiples of every kernel size: no crop
            B = torch.randn(m, RANK, generator=generator) / RANK
            factor = experts.kron2d_up(B, experts.identity(k, B.dtype, B.device), d_out)
            hidden = torch.randn(tokens, RANK, k, generator=generator)  # (token, ρ, p): the dense form's layout
            by_position = hidden.transpose(1, 2).contiguous().view(tokens * k, RANK)  # (token, p, ρ): the Kronecker
            out = torch.zeros(tokens, d_out)
            forms = {
                "dense": partial(out.addmm_, hidden.view(tokens, -1), factor.mT),
                "kronecker": partial(kronecker_up, out, by_position, B, k),
                "kronecker_product_only": partial(torch.mm, by_position, B.mT),
            }
            forms["dense"]()
            expected = out.clone()
            out.zero_()
            forms["kronecker"]()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # the same change either way
            steps = {name: repeated(form) for name, form in forms.items()}
            times = interleaved(steps, {name: plan.down_rounds for name in steps}, plan.warmup)
            micros = {name: statistics.median(times[name]) / DOWN_CALLS * 1e6 for name in steps}
            faster = "dense" if micros["dense"] <= micros["kronecker"] else "kronecker"
            rows.append({"d_out": d_out, "k": k, "tokens": tokens, **micros, "faster": faster})
    return {"calls_per_round": DOWN_CALLS, "rows": rows}


def kronecker_up(out: torch.Tensor, by_position: torch.Tensor, B: torch.Tensor, k: int) -> None:
    """``out += (B ⊗ I_k) h`` from the hidden states laid out (token, p, ρ): the product with B gives row
    p·m + i of each token's change, added back to row i·k + p."""
    tokens, m = out.shape[0], B.shape[0]
    out.view(tokens, m, k).add_(torch.mm(by_position, B.mT).view(tokens, k, m).transpose(1, 2))


# -- running and reporting -----------------------------------------------------------------------------------------
def target(value: float, op: str, bound: float) -> dict:
    met = value <= bound if op == "<=" else value >= bound
    return {"value": value, "target": f"{op} {bound}", "met": met}


def run(plan: Plan) -> dict:
    results = {"mode": plan.mode, "machine": machine_info(), "plan": asdict(plan)}
    print("mixed-task batch ...", file=sys.stderr, flush=True)
    smollm2, _ = load_case(SMOLLM2)
    results["mixed_batch"] = bench_mixed_batch(smollm2, plan)
    print("generation ...", file=sys.stderr, flush=True)
    results["generation"] = bench_generation(smollm2, plan)
    print("MiniLM training step ...", file=sys.stderr, flush=True)
    results["training"] = bench_training(plan)
    print("down factor forms ...", file=sys.stderr, flush=True)
    results["down_forms"] = bench_down_forms(plan)
    print("single requests ...", file=sys.stderr, flush=True)
    results["requests"] = bench_requests(smollm2, plan)
    print("up factor forms ...", file=sys.stderr, flush=True)
    results["up_forms"] = bench_up_forms(plan)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["targets"] = {
        "mixed batch: EPT / PEFT multi-LoRA (adapter_names)": target(
            results["mixed_batch"]["ept_vs_multi_lora"], "<=", 1.0
        ),
        "generation tokens/s: EPT / LoRA unmerged": target(
            results["generation"]["ept_vs_lora_tokens_per_s"], ">=", 0.85
        ),
        "MiniLM training step: EPT / LoRA": target(results["training"]["ept_vs_lora"], "<=", 1.20),
    }
    return results


def render(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"# Serving benchmark ({results['mode']})",
        "",
        f"{machine['cpu']}, {machine['torch_threads']} torch thread(s), torch {machine['torch']}, "
        f"{machine['date']}, load {machine['load_average_at_start']} -> {machine['load_average_at_end']}.",
        "",
        "| target | value | bound | met |",
        "|---|---|---|---|",
    ]
    for name, row in results["targets"].items():
        lines.append(f"| {name} | {row['value']:.3f} | {row['target']} | {'yes' if row['met'] else 'NO'} |")
    batch, gen, train = results["mixed_batch"], results["generation"], results["training"]
    lines += [
        "",
        f"## Mixed-task batch: {batch['rows']} x {batch['tokens']} tokens from {batch['tasks']} tasks, forward only",
        f"(EPT kernel-size groups in use per layer: {batch['ept_groups_used_per_layer']:.2f}; a task's rank as one "
        f"LoRA, r times its experts' kernel sizes: {batch['ept_task_rank']:.1f} on average)",
        "",
        timing_table(batch["variants"]),
        "",
        f"EPT / PEFT multi-LoRA at EPT's per-task rank (r={batch['rank_matched_lora_r']}: products of the sizes "
        f"EPT's rows-by-task path runs): {batch['ept_vs_rank_matched_multi_lora']:.3f}.",
        "",
        f"## Generation: {gen['prompts']} prompts x {gen['new_tokens']} new tokens, greedy",
        "",
        markdown_table(
            ["variant", "tokens/s", "median s", "n"],
            [[n, r["tokens_per_s"], r["median"], r["n"]] for n, r in gen["variants"].items()],
        ),
        "",
        f"## MiniLM training step: batch {train['batch']} x {train['seq']}",
        "",
        timing_table(train["variants"]),
        "",
        "Paired EPT / LoRA ratios: " + ", ".join(f"{r:.3f}" for r in train["paired_ratios"]),
        "",
    ]
    down, requests, up = results["down_forms"], results["requests"], results["up_forms"]
    lines += forms_section(
        "A kron2d group's down factor on a task's rows: product or dilated convolution",
        down,
        ["d_in", "k", "tokens", "product", "convolution", "the rule takes", "faster"],
        ["d_in", "k", "tokens", "product", "convolution", "rule", "faster"],
    )
    lines += [
        f"The rule (``experts.dilated_pays``) picks the faster form in {down['rule_agrees']} of "
        f"{len(down['rows'])} cases.",
        "",
        f"## Single requests of {requests['tokens']} tokens a row, forward only",
        "",
        timing_table(requests["variants"]),
        "",
        f"One task, EPT / LoRA unmerged: {requests['one_task_ept_vs_lora']:.3f}; two tasks, EPT / PEFT multi-LoRA "
        f"(adapter_names): {requests['two_tasks_ept_vs_multi_lora']:.3f}.",
        "",
    ]
    lines += forms_section(
        "A kron2d group's up factor on a task's hidden states: dense product or Kronecker form",
        up,
        ["d_out", "k", "tokens", "dense", "Kronecker", "its product alone", "faster"],
        ["d_out", "k", "tokens", "dense", "kronecker", "kronecker_product_only", "faster"],
    )
    return "\n".join(lines)


def forms_section(title: str, part: dict, header: list[str], keys: list[str]) -> list[str]:
    """A part that times two forms of one operation case by case (4 and 6): its heading and table."""
    return [
        f"## {title} (µs a call, median of rounds of {part['calls_per_round']} calls)",
        "",
        markdown_table(header, [[row[key] for key in keys] for row in part["rows"]]),
        "",
    ]


def timing_table(variants: dict) -> str:
    rows = [[name, row["median"], row["min"], row["max"], row["n"]] for name, row in variants.items()]
    return markdown_table(["variant", "median s", "min s", "max s", "n"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part at toy sizes (CI)")
    parser.add_argument("--out", type=Path, help=f"JSON result path (default {DEFAULT_OUT}; a temp file for --smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = PLANS["smoke" if args.smoke else "full"]
    out = args.out or (Path(tempfile.mkdtemp(prefix="serving-")) / "serving.json" if args.smoke else DEFAULT_OUT)
    results = run(plan)
    write_results(out, results, render(results))


if __name__ == "__main__":
    main()
