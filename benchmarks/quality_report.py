"""The report of a quality suite (``benchmarks/quality.py``), built from its run files alone.

Writes, beside the suite's run folder ``<results>/<suite>/``:

* ``<suite>.md``: the sweep (validation average per learning rate, the chosen one in bold), the final table (per
  method its chosen learning rate, parameters per task in both accountings, each task's reported metric as
  mean ± std over seeds, the average with its 95% bootstrap interval), collapse flags, and the verdict (each EPT
  form against every peer with at least its parameters per task, in either accounting: a paired bootstrap), and
  per method and task the learning rates of its grid at which it predicts one class (collapse across the grid);
* ``<suite>.json``: the same numbers;
* ``<suite>-sweep.png``: validation average against learning rate, one line per method.

A probe suite (``benchmark.probe``) also records each method's rate probe; a suite that names another in
``benchmark.compare_with`` (a shorter budget) states the answer at each budget in one sentence: for each EPT form, the
peers it ties, beats and loses to, with the paired intervals, and the methods with final runs.

Run by ``benchmarks/quality.py`` after its runs, or alone with the same arguments
(``python benchmarks/quality_report.py glue8 [--smoke] [--results-dir DIR]``).

Parameters per task (spec §2): total trainable weights over the tasks, heads left out; "all" counts routers and task
embeddings (as MoRE counts), "no router" the adapter weights only (as EPT counts).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pyramid_peft.analysis.params import paper_units
from pyramid_peft.analysis.significance import TaskRuns, bootstrap_score, paired_verdict
from pyramid_peft.analysis.sweeps import task_title
from pyramid_peft.atomic import atomic_write_text
from pyramid_peft.tasks import get_task
from quality import (
    RESULTS_DIR,
    RunKey,
    Suite,
    load_done,
    load_suite,
    parse_args,
    smoke_overrides,
    sweep_grid,
    validation_score,
    variant_plan,
)

PARAM_COLUMNS = {"per_task": "params/task (all)", "per_task_without_router": "params/task (no router)"}
COLLAPSE_MARK = "†"


def write_report(suite: Suite, results_dir: Path) -> str:
    """Write the suite's Markdown, JSON and plot; print a warning per collapsed run; returns the Markdown."""
    done = load_done(suite, results_dir)
    if not done and not suite.compare_with:  # a compared suite's answer is worth stating before this one's runs
        raise SystemExit(f"no result files in {results_dir / suite.key}: run the suite first.")
    rows = {v: variant_row(suite, v, done) for v in suite.sweep.variants if any(k.variant == v for k in done)}
    verdicts = verdict_rows(rows)
    answers = budget_answers(suite, results_dir, rows, verdicts) if suite.compare_with else {}
    for warning in [*collapse_warnings(done), *every_rate_warnings(rows)]:
        print(f"[quality] WARNING: {warning}", flush=True)
    plot = results_dir / f"{suite.key}-sweep.png"
    plot_sweep(rows, plot)
    markdown = (
        "\n\n".join(
            [
                f"<!-- written by benchmarks/quality.py {suite.key} -->",
                budget_line(suite),
                *([answers_section(answers)] if answers else []),
                *([probe_table(suite, rows)] if suite.probe else []),
                sweep_table(rows),
                f"![validation average against learning rate]({plot.name})",
                final_table(suite, rows),
                grid_collapse_table(suite, rows),
                verdict_table(verdicts),
                missing_line(suite, done),
                compute_line(done),
            ]
        )
        + "\n"
    )
    atomic_write_text(results_dir / f"{suite.key}.md", markdown)
    summary = {
        "suite": suite.key,
        "budget": budget(suite),
        "rows": {v: _json_row(r) for v, r in rows.items()},
        "verdicts": verdicts,
        **({"answers": answers} if answers else {}),
    }
    atomic_write_text(results_dir / f"{suite.key}.json", json.dumps(summary, indent=2) + "\n")
    return markdown


# -- per variant ----------------------------------------------------------------------------------------------
def variant_row(suite: Suite, variant: str, done: dict[RunKey, dict]) -> dict:
    """The variant's sweep (rate -> validation average, collapsed tasks), chosen rate and final runs."""
    _, chosen = variant_plan(suite, variant, done)
    trained = suite.trained(variant)
    rates = sweep_grid(suite, variant, done) if trained else [None]
    sweep = {
        lr: done[RunKey(variant, lr, suite.seeds[0])] for lr in rates if RunKey(variant, lr, suite.seeds[0]) in done
    }
    finals = [done[k] for k in (RunKey(variant, chosen if trained else None, s) for s in suite.seeds) if k in done]
    if trained and chosen is None:
        finals = []
    first = finals[0] if finals else next(iter(sweep.values()))
    return {
        "method": first["method"],
        "params": first.get("params", {}),
        "chosen": chosen,
        "trained": trained,
        "planned_seeds": len(suite.seeds) if trained else 1,  # the untrained floor is one run
        "sweep": {
            lr: {
                "validation": validation_score(suite, variant, lr, done),
                "seeds": sum(RunKey(variant, lr, s) in done for s in suite.seeds),
                "collapsed": collapsed_tasks(r),
            }
            for lr, r in sweep.items()
        },
        "at_edge": bool(trained and chosen is not None and chosen in _edges(suite, rates) and len(rates) > 1),
        "finals": finals,
    }


def _edges(suite: Suite, rates: list[float]) -> tuple[float, ...]:
    """The grid's edges that could still move: a probe never steps above the shorter budget's rate."""
    return (min(rates),) if suite.probe else (min(rates), max(rates))


def collapsed_tasks(record: dict) -> list[str]:
    return [t for t, r in record["reported"].items() if r["collapsed"]]


def collapse_warnings(done: dict[RunKey, dict]) -> list[str]:
    return [
        f"{k.name} predicts one class for every example of {', '.join(tasks)}"
        for k, r in sorted(done.items(), key=lambda item: item[0].name)
        if (tasks := collapsed_tasks(r))
    ]


def grid_collapses(row: dict) -> dict[str, list[float]]:
    """Per task it collapsed on anywhere, the learning rates of the method's grid at which the first seed's run
    predicted one class for every example."""
    tasks = sorted({t for entry in row["sweep"].values() for t in entry["collapsed"]})
    return {t: [lr for lr, entry in row["sweep"].items() if t in entry["collapsed"]] for t in tasks}


def collapses_everywhere(row: dict) -> list[str]:
    """The tasks on which the method predicts one class at every learning rate of its grid: no rate trains them."""
    return [t for t, rates in grid_collapses(row).items() if len(rates) == len(row["sweep"])]


def every_rate_warnings(rows: dict) -> list[str]:
    return [
        f"{variant} predicts one class on {task} at every learning rate of its grid"
        for variant, row in rows.items()
        if row["trained"]
        for task in collapses_everywhere(row)
    ]


def task_runs(records: list[dict], tasks: list[str]) -> list[TaskRuns]:
    """The bootstrap's view of a variant's final runs: per task its paper metric, labels and every seed's
    predictions on the reported split."""
    return [
        TaskRuns(
            get_task(t).paper_metric,
            records[0]["reported"][t]["labels"],
            [r["reported"][t]["predictions"] for r in records],
        )
        for t in tasks
    ]


def _tasks(rows: dict) -> list[str]:
    return (
        list(next(r for r in rows.values() if r["finals"])["finals"][0]["reported"])
        if any(r["finals"] for r in rows.values())
        else []
    )


def _table_tasks(suite: Suite, rows: dict) -> list[str]:
    """The tasks of the final runs in the table's column order."""
    return [t for t in suite.sweep.table.tasks if t in _tasks(rows)] or _tasks(rows)


# -- tables ---------------------------------------------------------------------------------------------------
def sweep_table(rows: dict) -> str:
    columns = rate_columns([lr for r in rows.values() if r["trained"] for lr in r["sweep"]])
    title = "### Learning-rate sweep (validation average, carved from train: the first seed, or the mean of n seeds)"
    if not columns:
        return f"{title}\n\nNo trained method has finished a sweep run yet."
    lines = _table_head(title, [*(_rate_label(column) for column in columns), "chosen"])
    for variant, row in rows.items():
        if not row["trained"]:
            continue
        cells = [_sweep_cell(_at_rate(row["sweep"], column), row["chosen"] in column) for column in columns]
        chosen = (
            "sweep running"
            if row["chosen"] is None
            else f"{row['chosen']:.3g}" + (" (grid edge)" if row["at_edge"] else "")
        )
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {chosen} |")
    lines += [
        "",
        f"{COLLAPSE_MARK}k: the first seed's run predicted one class for every example of k tasks. (grid edge): the "
        "best rate is still at the edge of the grid after its extensions.",
    ]
    return "\n".join(lines)


def _table_head(title: str, columns: list[str]) -> list[str]:
    """A table's title and head: the method's column left-aligned, then ``columns`` of numbers right-aligned."""
    return [
        title,
        "",
        "| Method | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]


def rate_columns(rates: list[float], tolerance: float = 0.01) -> list[list[float]]:
    """The sweep table's columns: the distinct rates, ascending, with rates within ``tolerance`` of each other in one
    column (a grid extension of a rounded grid, 3.16e-4 / sqrt(10) = 9.99e-5, shares 1e-4's column)."""
    columns: list[list[float]] = []
    for lr in sorted(set(rates)):
        if columns and lr <= columns[-1][0] * (1 + tolerance):
            columns[-1].append(lr)
        else:
            columns.append([lr])
    return columns


def _rate_label(column: list[float]) -> str:
    return min((f"{lr:.3g}" for lr in column), key=len)


def _at_rate(sweep: dict, column: list[float]) -> dict | None:
    return next((sweep[lr] for lr in column if lr in sweep), None)


def _sweep_cell(entry: dict | None, chosen: bool) -> str:
    if entry is None:
        return ""
    text = f"{entry['validation']:.1f}" + (f" (n={entry['seeds']})" if entry["seeds"] > 1 else "")
    text += f" {COLLAPSE_MARK}{len(entry['collapsed'])}" if entry["collapsed"] else ""
    return f"**{text}**" if chosen else text


def final_table(suite: Suite, rows: dict) -> str:
    tasks = _table_tasks(suite, rows)
    title = f"### {suite.sweep.table.title} (reported split, final runs)"
    if not tasks:
        return f"{title}\n\nNo method has a final run yet."
    header = ["lr", "seeds", *PARAM_COLUMNS.values(), *(task_title(t) for t in tasks), "AVG", "95% CI"]
    lines = _table_head(title, header)
    for variant, row in rows.items():
        if not row["finals"]:
            continue
        interval = bootstrap_score(task_runs(row["finals"], tasks))
        cells = [_task_cell(row["finals"], t) for t in tasks]
        averages = [r["average"]["paper_average"] for r in row["finals"]]
        rate = "–" if row["chosen"] is None else f"{row['chosen']:.3g}"
        params = [_param_cell(row["params"].get(k)) for k in PARAM_COLUMNS]
        seeds = f"{len(row['finals'])}/{row['planned_seeds']}"  # final seeds done of those the suite runs
        lines.append(
            "| "
            + " | ".join(
                [variant, rate, seeds, *params, *cells, _spread(averages), f"[{interval.low:.1f}, {interval.high:.1f}]"]
            )
            + " |"
        )
    lines += [
        "",
        "Each task's paper metric (x100; MCC for CoLA, Pearson for STS-B, accuracy else) on the reported "
        "split, mean ± std over the seeds done (seeds: done / planned; a row short of its seeds is not final); "
        "95% CI: percentile bootstrap of the average over evaluation examples "
        f"(within tasks) and seeds. {COLLAPSE_MARK}k: k seeds predicted one class on that task.",
    ]
    return "\n".join(lines)


def grid_collapse_table(suite: Suite, rows: dict) -> str:
    trained = {v: r for v, r in rows.items() if r["trained"] and r["sweep"]}
    classification = [t for t in _tasks(rows) if not get_task(t).is_regression]
    tasks = [t for t in suite.sweep.table.tasks if t in classification] or classification
    title = "### Collapse across the grid (reported split, the first seed at each learning rate of the sweep)"
    if not trained or not tasks:
        return f"{title}\n\nNo trained method has finished a sweep run yet."
    lines = _table_head(title, ["rates", *(task_title(t) for t in tasks)])
    everywhere = []
    for variant, row in trained.items():
        rates = len(row["sweep"])
        collapses, always = grid_collapses(row), collapses_everywhere(row)
        everywhere += [f"{variant} on {task_title(t)}" for t in tasks if t in always]
        cells = [f"**{rates}/{rates}**" if t in always else f"{len(collapses.get(t, []))}/{rates}" for t in tasks]
        lines.append(f"| {variant} | {rates} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "k/n: at k of the n learning rates of the method's grid (the sweep table's columns), the first seed's run "
        "predicted one class for every example of the task; **n/n**: the method collapses on the task at every rate "
        "it was run at, so no choice of rate in its grid trains that task at this budget. "
        + (
            "At every rate of its grid: " + "; ".join(everywhere) + "."
            if everywhere
            else "No method collapses on a task at every rate of its grid."
        ),
    ]
    return "\n".join(lines)


def _task_cell(records: list[dict], task: str) -> str:
    values = [r["metrics"][task]["paper"] for r in records]
    collapsed = sum(r["reported"][task]["collapsed"] for r in records)
    return _spread(values) + (f" {COLLAPSE_MARK}{collapsed}" if collapsed else "")


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f}±{statistics.stdev(values):.1f}"


def _param_cell(count: float | None) -> str:
    return "–" if count is None else paper_units(count)


# -- the verdict ----------------------------------------------------------------------------------------------
def verdict_rows(rows: dict) -> list[dict]:
    """Each EPT form against every trained peer with at least its parameters per task in either accounting."""
    tasks = _tasks(rows)
    found = []
    for name, mine in rows.items():
        if mine["method"] != "ept" or not mine["finals"]:
            continue
        for peer, theirs in rows.items():
            if theirs["method"] in ("ept", "none") or not theirs["finals"]:
                continue
            covers = [k for k in PARAM_COLUMNS if theirs["params"].get(k, 0) >= mine["params"].get(k, float("inf"))]
            if covers:
                found.append(_verdict(name, mine, peer, theirs, covers, tasks))
    return found


def _verdict(name: str, mine: dict, peer: str, theirs: dict, covers: list[str], tasks: list[str]) -> dict:
    same_seeds = [r["seed"] for r in mine["finals"]] == [r["seed"] for r in theirs["finals"]]
    verdict = paired_verdict(task_runs(mine["finals"], tasks), task_runs(theirs["finals"], tasks), same_seeds)
    difference = verdict.difference
    return {
        "ept": name,
        "peer": peer,
        "accountings": covers,
        "word": verdict.word,
        "seeds": f"{len(mine['finals'])}/{mine['planned_seeds']} vs {len(theirs['finals'])}/{theirs['planned_seeds']}",
        # Until both rows have every planned seed, the verdict may still change: it is shown as provisional.
        "final": len(mine["finals"]) == mine["planned_seeds"] and len(theirs["finals"]) == theirs["planned_seeds"],
        "difference": difference.estimate,
        "low": difference.low,
        "high": difference.high,
    }


def verdict_table(verdicts: list[dict]) -> str:
    if not verdicts:
        return "### Verdict\n\nNo EPT form and peer both have final runs yet."
    lines = [
        "### Verdict: EPT against every peer with at least its parameters per task",
        "",
        "| EPT | peer | peer has >= params in | seeds | EPT - peer (average) | 95% CI | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for v in verdicts:
        accountings = ", ".join(PARAM_COLUMNS[k].removeprefix("params/task ") for k in v["accountings"])
        word = v["word"] if v["final"] else f"{v['word']} (provisional)"
        lines.append(
            f"| {v['ept']} | {v['peer']} | {accountings} | {v['seeds']} | {v['difference']:+.2f} | "
            f"[{v['low']:+.2f}, {v['high']:+.2f}] | {word} |"
        )
    lines += [
        "",
        "Paired bootstrap over evaluation examples (the same rows for both) and seeds (the same seeds for "
        "both where both ran them): better / worse when the 95% interval of the difference excludes 0. Seeds: final "
        "seeds done / planned, EPT vs peer; a verdict is provisional until both have all of theirs.",
    ]
    return "\n".join(lines)


# -- the rate probe and the answer at each budget -------------------------------------------------------------
def probe_table(suite: Suite, rows: dict) -> str:
    """Per method: the shorter budget's rate, the probe's runs from it down (validation average of the first seed)
    and the rule each step applied, and the rate chosen."""
    title = "### Rate probe (the first seed, validation average: the shorter budget's rate, then one step below)"
    if not any(row["trained"] for row in rows.values()):
        return f"{title}\n\nNo probe run has finished yet."
    lines = _table_head(title, ["from the shorter budget", "probe", "chosen"])
    for variant, row in rows.items():
        if not row["trained"]:
            continue
        start = suite.grids[variant][-1]
        rates = sorted((lr for lr in row["sweep"] if lr <= start * 1.01), reverse=True)
        score = {lr: row["sweep"][lr]["validation"] for lr in rates}
        steps = [f"{rates[0]:.3g}: {score[rates[0]]:.1f}"] if rates else []
        for higher, lower in zip(rates, rates[1:]):
            steps.append(f"{lower:.3g}: {score[lower]:.1f} ({'wins' if score[lower] >= score[higher] else 'loses'})")
        chosen = "probe running" if row["chosen"] is None else f"{row['chosen']:.3g}"
        lines.append(f"| {variant} | {start:.3g} | {'; '.join(steps)} | {chosen} |")
    lines += [
        "",
        "The rate chosen at the shorter budget and one step below it (a factor "
        f"{next(iter(suite.ratios.values()), 0):.3g}) run first; when the lower wins (is at least as good), one more "
        f"step below (at most {suite.max_extensions}); the best gets the other seeds (wins / loses: against the rate "
        "above it).",
    ]
    return "\n".join(lines)


def budget_answers(suite: Suite, results_dir: Path, rows: dict, verdicts: list[dict]) -> dict[str, str]:
    """``{suite: sentence}`` for the compared suite (its own results beside this one's) and this one."""
    other = load_suite(suite.compare_with, suite.sweep.shared, {"tasks": suite.sweep.table.tasks})  # same overrides
    done = load_done(other, results_dir)
    other_rows = {v: variant_row(other, v, done) for v in other.sweep.variants if any(k.variant == v for k in done)}
    answers = {}
    for each, each_rows, each_verdicts in ((other, other_rows, verdict_rows(other_rows)), (suite, rows, verdicts)):
        answers[each.key] = answer_sentence(each, each_rows, each_verdicts)
    return answers


VERBS = {"no significant difference": "ties", "better": "beats", "worse": "loses to"}


def answer_sentence(suite: Suite, rows: dict, verdicts: list[dict]) -> str:
    """One sentence: per EPT form its average [95% CI] and the peers it ties, beats and loses to, each with the
    paired difference [95% CI]; the methods covered (final seeds done / planned); provisional until all are done."""
    steps = f"{budget(suite)['max_steps']:,} steps ({suite.key}.md"
    covered = ", ".join(f"{v} {len(r['finals'])}/{r['planned_seeds']}" for v, r in rows.items() if r["finals"])
    if not verdicts:
        covered = covered or "none"
        return f"At {steps}): no verdict yet; no EPT form and peer both have final runs (final seeds: {covered})."
    tasks = _table_tasks(suite, rows)  # the final table's order: the same bootstrap draws, the same interval
    clauses = []
    for ept in dict.fromkeys(v["ept"] for v in verdicts):
        interval = bootstrap_score(task_runs(rows[ept]["finals"], tasks))
        average = statistics.fmean(r["average"]["paper_average"] for r in rows[ept]["finals"])
        parts = []
        for word, verb in VERBS.items():
            peers = [
                f"{v['peer']} ({v['difference']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}])"
                for v in verdicts
                if v["ept"] == ept and v["word"] == word
            ]
            if peers:
                parts.append(f"{verb} {_join(peers)}")
        clauses.append(f"{ept} ({average:.1f} [{interval.low:.1f}, {interval.high:.1f}]) {_join(parts)}")
    provisional = "" if all(v["final"] for v in verdicts) else "provisionally (not every seed has run), "
    return (
        f"At {steps}; final seeds done/planned: {covered}), {provisional}"
        + "; ".join(clauses)
        + " (EPT - peer on the average over tasks, 95% paired-bootstrap intervals)."
    )


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def answers_section(answers: dict[str, str]) -> str:
    return "\n".join(["### The answer at each budget", "", *(f"- {answer}" for answer in answers.values())])


# -- plot, budget, what is left -------------------------------------------------------------------------------
def plot_sweep(rows: dict, path: Path) -> None:
    """Validation average against learning rate (log scale), one line per trained method, the chosen rate ringed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for variant, row in rows.items():
        if not row["trained"] or not row["sweep"]:
            continue
        rates = sorted(row["sweep"])
        (line,) = axes.plot(rates, [row["sweep"][lr]["validation"] for lr in rates], marker="o", label=variant)
        if row["chosen"] is not None:
            axes.plot(
                [row["chosen"]],
                [row["sweep"][row["chosen"]]["validation"]],
                marker="o",
                markersize=12,
                fillstyle="none",
                color=line.get_color(),
            )
    axes.set(
        xscale="log",
        xlabel="peak learning rate",
        ylabel="validation average (x100)",
        title="Learning-rate sweep (ringed: chosen)",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    partial.replace(path)


def budget(suite: Suite) -> dict:
    """The shared budget: steps, batch, schedule, evaluation cap, protocol, seeds, grid rule."""
    config = suite.sweep.config(next(iter(suite.sweep.variants)))
    keys = ("max_steps", "per_device_train_batch_size", "warmup_steps", "lr_scheduler_type")
    return {
        **{k: config.training.get(k) for k in keys},
        "max_source_length": config.data.max_source_length,
        "protocol": config.data.protocol,
        "max_eval_examples": config.data.max_eval_examples,
        "sampling": config.sampling.strategy,
        "seeds": suite.seeds,
        "max_extensions": suite.max_extensions,
    }


def budget_line(suite: Suite) -> str:
    return "Budget: " + ", ".join(f"{k} {v}" for k, v in budget(suite).items()) + "."


def missing_line(suite: Suite, done: dict[RunKey, dict]) -> str:
    """The runs each variant still needs (as far as they are known: later sweep steps depend on earlier ones)."""
    left = [k.name for v in suite.sweep.variants if suite.runnable(v) for k in variant_plan(suite, v, done)[0]]
    return f"Runs needed next: {', '.join(left) if left else 'none (the suite is complete)'}."


def compute_line(done: dict[RunKey, dict]) -> str:
    """The machine time the finished runs took: process-hours (each run is one single-thread process; workers side
    by side overlap in wall-clock time), and the median run. A run resumed over sittings counts its last one."""
    seconds = sorted(r["wall_seconds"] for r in done.values())
    if not seconds:
        return "Machine time: no run has finished yet."
    resumed = sum(1 for r in done.values() if r.get("resumed_from"))
    return (
        f"Machine time: {len(seconds)} runs, {sum(seconds) / 3600:.2f} process-hours in all (training and "
        f"evaluation), median {statistics.median(seconds) / 60:.1f} minutes a run"
        + (f"; {resumed} resumed runs count their last sitting only." if resumed else ".")
    )


def _json_row(row: dict) -> dict:
    finals = row["finals"]
    return {
        "method": row["method"],
        "params": row["params"],
        "chosen_learning_rate": row["chosen"],
        "sweep": {f"{lr:.3g}" if lr is not None else "none": s for lr, s in row["sweep"].items()},
        "at_edge": row["at_edge"],
        "seeds": [r["seed"] for r in finals],
        "average": [r["average"]["paper_average"] for r in finals],
        "metrics": {t: [r["metrics"][t]["paper"] for r in finals] for t in (finals[0]["metrics"] if finals else [])},
        "collapsed": {r["seed"]: collapsed_tasks(r) for r in finals},
        "grid_collapses": {t: [f"{lr:.3g}" for lr in rates] for t, rates in grid_collapses(row).items()},
        "wall_seconds": [r["wall_seconds"] for r in finals],
    }


def main(argv: list[str] | None = None) -> None:
    """Write the report of the suite that ``quality.py`` with the same arguments ran (``--results-dir`` given, or
    the default results folder)."""
    args = parse_args(argv)
    shared, benchmark = smoke_overrides(args.suite) if args.smoke else ({}, {})
    print(write_report(load_suite(args.suite, shared, benchmark), args.results_dir or RESULTS_DIR))


if __name__ == "__main__":
    main()
