"""Every committed result file of the quality suites still loads under the suite's config: the comparison of a
result's recorded config with the suite's (the library's :func:`config_differences`) finds no difference. No
record names a folder of the machine it ran on."""

import json
from pathlib import Path

import pytest
from _scripts import import_benchmark


@pytest.fixture(scope="module")
def quality():
    return import_benchmark("quality")


@pytest.mark.parametrize("suite", ["glue8", "glue8-1200", "commonsense4"])
def test_the_committed_results_load_under_their_suite(quality, suite):
    results = quality.RESULTS_DIR / suite
    if not results.is_dir():
        pytest.skip(f"no committed results for {suite}")
    done = quality.load_done(quality.load_suite(suite), quality.RESULTS_DIR)
    assert len(done) == len(list(results.glob("*.json")))


def test_committed_records_keep_run_paths_relative(quality):
    records = [json.loads(path.read_text()) for path in quality.RESULTS_DIR.glob("*/*.json")]
    assert records
    for record in records:
        for path in (record["config"]["training"]["output_dir"], record.get("resumed_from")):
            assert path is None or not Path(path).is_absolute(), path


def test_portable_run_paths(quality, tmp_path, monkeypatch):
    """Under the working directory a path is kept relative to it; elsewhere it is named under ``<runs-dir>``;
    relative paths and None are kept as they are."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere" / "runs"
    here.mkdir()
    monkeypatch.chdir(here)
    inside = here / "runs" / "benchmarks"
    assert quality.portable(str(inside / "glue8" / "run"), inside) == "runs/benchmarks/glue8/run"
    assert quality.portable(str(elsewhere / "glue8" / "run" / "checkpoint-9"), elsewhere) == (
        "<runs-dir>/glue8/run/checkpoint-9"
    )
    assert quality.portable("runs/benchmarks/glue8/run", inside) == "runs/benchmarks/glue8/run"
    assert quality.portable(None, inside) is None
