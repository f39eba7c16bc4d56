"""Every committed result file of the quality suites still loads under the suite's config: the comparison of a
result's recorded config with the suite's (the library's :func:`config_differences`) finds no difference."""

import pytest
from _scripts import import_benchmark


@pytest.fixture(scope="module")
def quality():
    return import_benchmark("quality")


@pytest.mark.parametrize("suite", ["glue8", "commonsense4"])
def test_the_committed_results_load_under_their_suite(quality, suite):
    results = quality.RESULTS_DIR / suite
    if not results.is_dir():
        pytest.skip(f"no committed results for {suite}")
    done = quality.load_done(quality.load_suite(suite), quality.RESULTS_DIR)
    assert len(done) == len(list(results.glob("*.json")))
