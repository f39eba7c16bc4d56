"""Sweeps (named variants of one experiment config) and the paper-layout summary of their results.

Sweep file (``configs/sweeps/*.yaml``)::

    name: table4-pyramid          # optional; default: the file name without extension
    base: ../quickstart.yaml      # the experiment config every variant starts from, relative to this file
    set: {data.max_eval_examples: 200}   # optional: overrides for every variant, applied before the variant's
    seeds: [42, 43, 44]           # optional; default: the base config's training.seed
    table:                        # optional: how `ept analyze sweep` lays out the results
      title: "Table 4: ..."
      row_header: Methods         # header of the column of variant names
      columns: [AB init, Top-K, ALP]   # label columns instead of the names; each variant gives its cells
      tasks: [mnli, qqp, ...]     # task columns in this order (default: every task in the results)
      average: true               # the AVG column (mean of the tasks' paper metrics)
      params: per_task            # optional: a params/task column from the results' "params"
    variants:                     # name -> overrides, in table row order
      ept-2: {method.kernel_sizes: [2, 2, 2, 2, 2, 2, 2, 2]}

Override keys are those of ``ept train`` (``method.r``, ``data.max_eval_examples``, bare training fields such as
``max_steps``, ``tasks``); a section name with a mapping (``method: {name: lora, r: 4}``) replaces the section.
A variant's ``columns`` key is not an override: it holds its cells for ``table.columns``. Each variant-seed runs in
``runs/sweeps/<name>/<variant>-seed<seed>``.

Result file: one JSON per variant and seed, written by whoever runs the sweep (:func:`result_record` builds it
from what ``train`` / ``evaluate_run`` return)::

    {"variant": "ept-2", "seed": 42, "method": "ept",
     "params": {"total": 4913664, "per_task": 614208.0, "per_task_without_router": 208512.0, ...},
     "metrics": {"mnli": {"accuracy": 86.0, "paper": 86.0}, ...},      # per task; "paper": the number the paper
     "average": {"paper_average": 86.5, "full_average": 86.4}}           # reports, x 100

``params`` is :func:`pyramid_peft.count_parameters` output (optional); ``metrics`` holds each task's metrics with
its ``"paper"`` value; ``average`` the two averages of :func:`pyramid_peft.metrics.average_scores`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..tasks import UnknownTaskError, get_task
from ..training.config import SECTIONS, ExperimentConfig, from_dict, read_yaml, set_dotted
from .params import paper_units

SWEEP_RUNS_DIR = "runs/sweeps"


@dataclass
class TableLayout:
    """How a sweep's results are laid out (see the module docstring)."""

    title: str = ""
    row_header: str = "Methods"
    columns: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    average: bool = True
    params: str | None = None


@dataclass
class Sweep:
    """A parsed sweep file: the base config (as a raw mapping), shared overrides, variants and seeds."""

    name: str
    base: dict
    shared: dict
    variants: dict[str, dict]
    seeds: list[int]
    table: TableLayout
    cells: dict[str, list[str]]  # variant -> its cells for table.columns

    def config(self, variant: str, seed: int | None = None) -> ExperimentConfig:
        """The experiment config of one variant (and seed), with its own output folder."""
        if variant not in self.variants:
            raise KeyError(f"sweep {self.name!r} has no variant {variant!r}; it has {list(self.variants)}.")
        raw = json.loads(json.dumps(self.base))  # a deep copy of plain YAML data
        for key, value in [*self.shared.items(), *self.variants[variant].items()]:
            apply_override(raw, key, value)
        seed = self.seeds[0] if seed is None else seed
        output_dir = f"{SWEEP_RUNS_DIR}/{self.name}/{variant}-seed{seed}"
        raw.setdefault("training", {}).update(seed=seed, output_dir=output_dir)
        return from_dict(raw, source=f"sweep {self.name!r} variant {variant!r}")

    def runs(self) -> list[tuple[str, int, ExperimentConfig]]:
        """Every (variant, seed, config) of the sweep, variants in table order."""
        return [(v, s, self.config(v, s)) for v in self.variants for s in self.seeds]


def apply_override(raw: dict, key: str, value) -> None:
    """Set one override in a raw config mapping: a whole section, or a key as ``ept train`` reads it."""
    if key in SECTIONS and key != "tasks" and isinstance(value, dict):
        raw[key] = dict(value)
    else:
        set_dotted(raw, key, value)


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file and its base config."""
    path = Path(path)
    spec = read_yaml(path.read_text()) or {}
    unknown = set(spec) - {"name", "description", "base", "set", "seeds", "table", "variants"}
    if unknown or "base" not in spec or not spec.get("variants"):
        raise ValueError(f"{path}: a sweep needs 'base' and 'variants' (unknown keys: {sorted(unknown) or 'none'}).")
    base = read_yaml((path.parent / spec["base"]).read_text()) or {}
    variants = {str(name): dict(overrides or {}) for name, overrides in spec["variants"].items()}
    cells = {name: [str(c) for c in overrides.pop("columns", [])] for name, overrides in variants.items()}
    table = TableLayout(**(spec.get("table") or {}))
    wrong = [name for name, row in cells.items() if len(row) != len(table.columns)]
    if wrong:
        raise ValueError(f"{path}: variants {wrong} need one 'columns' cell per table column {table.columns}.")
    seeds = [int(s) for s in spec.get("seeds") or [(base.get("training") or {}).get("seed", 42)]]
    return Sweep(str(spec.get("name") or path.stem), base, dict(spec.get("set") or {}), variants, seeds, table, cells)


# -- results --------------------------------------------------------------------------------------------------
def result_record(variant: str, seed: int, results: dict, params: dict | None = None) -> dict:
    """The result JSON of one variant-seed, from what ``train`` / ``evaluate_run`` return."""
    return {
        "variant": variant,
        "seed": seed,
        "method": results.get("method"),
        "params": params or {},
        "metrics": {task: dict(r["metrics"]) for task, r in results["tasks"].items()},
        "average": {k: results[k] for k in ("paper_average", "full_average")},
    }


def load_results(paths: list[str | Path]) -> list[dict]:
    """Result records from JSON files, or from every ``*.json`` under folders."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    records = [json.loads(f.read_text()) for f in files]
    bad = [str(f) for f, r in zip(files, records) if not {"variant", "metrics", "average"} <= set(r)]
    if bad:
        raise ValueError(f"not sweep result files (need 'variant', 'metrics', 'average'): {bad}")
    return records


def summarize(result_files: list[str | Path], sweep: Sweep | str | Path | None = None) -> str:
    """The results of a sweep as a Markdown table in the paper's layout: one row per variant, mean over seeds.

    With ``sweep`` (a :class:`Sweep` or its file), rows follow its variant order and its ``table`` layout;
    without, rows follow the files and every task found gets a column.
    """
    records = load_results(result_files)
    if not records:
        raise ValueError("no result files given.")
    sweep = load_sweep(sweep) if isinstance(sweep, (str, Path)) else sweep
    layout = sweep.table if sweep else TableLayout()
    by_variant: dict[str, list[dict]] = {}
    for record in records:
        by_variant.setdefault(record["variant"], []).append(record)
    order = [v for v in (sweep.variants if sweep else []) if v in by_variant]
    order += [v for v in by_variant if v not in order]
    tasks = layout.tasks or list(dict.fromkeys(t for r in records for t in r["metrics"]))
    labels = [_labels(v, by_variant[v], sweep, layout) for v in order]
    values = [_row_values(by_variant[v], tasks, layout) for v in order]
    return _markdown(layout, tasks, labels, values, [len(by_variant[v]) for v in order])


def _labels(variant: str, records: list[dict], sweep: Sweep | None, layout: TableLayout) -> list[str]:
    """The row's label cells: the variant name (or its ``columns`` cells), then params/task if asked for."""
    cells = list(sweep.cells[variant]) if sweep and layout.columns and variant in sweep.cells else [variant]
    if layout.params:
        count = records[0].get("params", {}).get(layout.params)
        cells.append(paper_units(count) if count is not None else "–")
    return cells


def _row_values(records: list[dict], tasks: list[str], layout: TableLayout) -> list[list[float]]:
    """Per column of a row, its values over seeds (empty where a result lacks the task)."""
    columns = [[r["metrics"][t]["paper"] for r in records if t in r["metrics"]] for t in tasks]
    if layout.average:
        columns.append([r["average"]["paper_average"] for r in records])
    return columns


def _markdown(layout: TableLayout, tasks: list[str], labels: list[list[str]], values: list, seeds: list[int]) -> str:
    label_headers = [*(layout.columns or [layout.row_header]), *(["params/task"] if layout.params else [])]
    value_headers = [*(task_title(t) for t in tasks), *(["AVG"] if layout.average else [])]
    means = [[statistics.fmean(v) if v else None for v in row] for row in values]
    # With one row there is nothing to rank.
    tops = [_top_two([row[c] for row in means]) if len(means) > 1 else (None, None) for c in range(len(value_headers))]
    lines = [f"### {layout.title}", ""] if layout.title else []
    lines.append("| " + " | ".join([*label_headers, *value_headers]) + " |")
    lines.append("| " + " | ".join(["---"] * len(label_headers) + ["---:"] * len(value_headers)) + " |")
    for label, row, row_means in zip(labels, values, means):
        cells = [_cell(v, m, top) for v, m, top in zip(row, row_means, tops)]
        lines.append("| " + " | ".join([*label, *cells]) + " |")
    spread = "mean ± standard deviation over seeds" if max(seeds) > 1 else "one seed"
    lines += [
        "",
        f"Paper metric of each task (x100), {spread} ({_seed_range(seeds)} per row); best of each "
        "column in bold, second in italics.",
    ]
    return "\n".join(lines) + "\n"


def task_title(task: str) -> str:
    """How tables name a task: its spec's ``title`` (the paper's spelling), or the name itself if unknown."""
    try:
        return get_task(task).display_name
    except UnknownTaskError:
        return task


def _seed_range(seeds: list[int]) -> str:
    return str(seeds[0]) if min(seeds) == max(seeds) else f"{min(seeds)}-{max(seeds)}"


def _top_two(column: list[float | None]) -> tuple[float | None, float | None]:
    present = sorted({v for v in column if v is not None}, reverse=True)
    return (present[0] if present else None, present[1] if len(present) > 1 else None)


def _cell(values: list[float], mean: float | None, top: tuple) -> str:
    if mean is None:
        return "–"
    text = f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f}±{statistics.stdev(values):.2f}"
    if mean == top[0]:
        return f"**{text}**"
    return f"*{text}*" if mean == top[1] else text
