"""Bootstrap intervals, the paired verdict and collapse flags, against independent computations: scikit-learn /
scipy metrics, ``scipy.stats.bootstrap``, and hand-computed cases; properties that hold for every input, with
hypothesis."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from pyramid_peft.analysis.significance import (
    BETTER,
    SAME,
    WORSE,
    TaskRuns,
    bootstrap_score,
    collapsed,
    metric_rows,
    paired_verdict,
    score,
)
from pyramid_peft.metrics import accuracy, f1_binary, matthews_corr, pearson

REFERENCE = {"accuracy": accuracy, "mcc": matthews_corr, "f1": f1_binary, "pearson": pearson}


def labels_and_predictions(classes):
    return st.integers(2, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, classes - 1), min_size=n, max_size=n),
            st.lists(st.integers(0, classes - 1), min_size=n, max_size=n),
        )
    )


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([("accuracy", 3), ("mcc", 3), ("mcc", 2), ("f1", 2)]).flatmap(
        lambda case: st.tuples(st.just(case[0]), labels_and_predictions(case[1]))
    )
)
def test_resampled_metrics_equal_the_library_metrics(case):
    metric, (labels, predictions) = case
    row = metric_rows(metric, np.array([predictions], float), np.array([labels], float))[0]
    assert row == pytest.approx(100 * REFERENCE[metric](predictions, labels), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 30).flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(0, 5, allow_nan=False), min_size=n, max_size=n),
            st.lists(st.floats(0, 5, allow_nan=False), min_size=n, max_size=n),
        )
    )
)
@example(([0.0, 1.9e-303, 0.0], [1.0, 0.0, 2.0]))  # tiny distinct labels: their squares underflow to 0
def test_resampled_pearson_equals_scipy(pair):
    labels, predictions = pair
    row = metric_rows("pearson", np.array([predictions]), np.array([labels]))[0]
    assert row == pytest.approx(100 * pearson(predictions, labels), abs=1e-6)


def test_none_predictions_count_as_wrong_as_the_metrics_module_says():
    task = TaskRuns("accuracy", [0, 1, 2, 1], [[0, None, 2, None]])
    assert score([task]) == 100 * accuracy([0, None, 2, None], [0, 1, 2, 1]) == 50.0
    regression = TaskRuns("pearson", [1.0, 2.0, 3.0], [[1.0, None, 3.5]])
    assert score([regression]) == pytest.approx(100 * pearson([1.0, None, 3.5], [1.0, 2.0, 3.0]))


def test_the_score_averages_tasks_then_seeds_by_hand():
    first = TaskRuns("accuracy", [1, 1, 0, 0], [[1, 1, 0, 0], [1, 0, 0, 0]])  # 100, 75
    second = TaskRuns("mcc", [1, 0, 1, 0], [[1, 0, 1, 0], [0, 1, 0, 1]])  # 100, -100
    assert score([first, second]) == pytest.approx((100 + 75 + 100 - 100) / 4)


def test_one_task_one_seed_interval_matches_scipy_bootstrap():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    predictions = np.where(rng.random(400) < 0.7, labels, 1 - labels)
    ours = bootstrap_score([TaskRuns("accuracy", labels.tolist(), [predictions.tolist()])], resamples=20000, seed=1)
    reference = stats.bootstrap(
        ((predictions == labels) * 100.0,),
        np.mean,
        n_resamples=20000,
        method="percentile",
        random_state=np.random.default_rng(2),
    ).confidence_interval
    assert ours.estimate == pytest.approx(100 * np.mean(predictions == labels))
    # Two Monte Carlo estimates of the same percentiles: standard error about 0.1 point here.
    assert ours.low == pytest.approx(reference.low, abs=0.5) and ours.high == pytest.approx(reference.high, abs=0.5)


def test_mcc_interval_matches_scipys_paired_bootstrap():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 150)
    predictions = np.where(rng.random(150) < 0.75, labels, 1 - labels)
    ours = bootstrap_score([TaskRuns("mcc", labels.tolist(), [predictions.tolist()])], resamples=4000, seed=1)
    # For two classes MCC is the phi coefficient: the Pearson correlation of the 0/1 vectors.
    reference = stats.bootstrap(
        (predictions, labels),
        lambda p, y: 100 * np.corrcoef(p, y)[0, 1],
        paired=True,
        vectorized=False,
        n_resamples=4000,
        method="percentile",
        random_state=np.random.default_rng(2),
    ).confidence_interval
    assert ours.low == pytest.approx(reference.low, abs=1.5) and ours.high == pytest.approx(reference.high, abs=1.5)


def test_seed_resampling_widens_the_interval_by_the_spread_of_seeds():
    labels = [0, 1] * 200
    good, bad = labels, [1 - y if i % 4 == 0 else y for i, y in enumerate(labels)]  # 100 and 75
    steady = bootstrap_score([TaskRuns("accuracy", labels, [good, good])], resamples=2000)
    spread = bootstrap_score([TaskRuns("accuracy", labels, [good, bad])], resamples=2000)
    assert (steady.low, steady.high) == (100.0, 100.0)
    # Both seed draws are the 75% seed with probability 1/4, so the 2.5th percentile is the 10th percentile of that
    # seed's accuracy under example resampling: 75 + z(0.10) sqrt(0.75 * 0.25 / 400) x 100 = 75 - 1.2816 x 2.165.
    assert spread.low == pytest.approx(75 - 1.2816 * 2.165, abs=0.8) and spread.high == 100.0


runs = st.integers(5, 30).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
        st.lists(st.lists(st.integers(0, 1), min_size=n, max_size=n), min_size=1, max_size=3),
        st.lists(st.lists(st.integers(0, 1), min_size=n, max_size=n), min_size=1, max_size=3),
    )
)


@settings(max_examples=40, deadline=None)
@given(runs)
def test_a_method_against_itself_is_no_significant_difference_exactly(data):
    labels, mine, _ = data
    verdict = paired_verdict(
        [TaskRuns("accuracy", labels, mine)], [TaskRuns("accuracy", labels, mine)], True, resamples=200
    )
    assert verdict.word == SAME
    assert (verdict.difference.estimate, verdict.difference.low, verdict.difference.high) == (0.0, 0.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(runs)
def test_swapping_the_methods_negates_the_difference_and_flips_the_word(data):
    labels, mine, theirs = data
    same = len(mine) == len(theirs)
    ab = paired_verdict([TaskRuns("mcc", labels, mine)], [TaskRuns("mcc", labels, theirs)], same, resamples=200)
    ba = paired_verdict([TaskRuns("mcc", labels, theirs)], [TaskRuns("mcc", labels, mine)], same, resamples=200)
    assert ab.difference.estimate == pytest.approx(-ba.difference.estimate)
    assert ab.difference.low <= ab.difference.estimate or ab.difference.low <= ab.difference.high
    if same:  # the same draws for both: the interval mirrors exactly
        assert ab.difference.low == pytest.approx(-ba.difference.high)
        assert {ab.word, ba.word} in ({SAME}, {BETTER, WORSE})


def test_a_clearly_better_method_is_better_and_pairing_resolves_a_small_gap():
    labels = [0, 1] * 300
    perfect = [labels] * 3
    one_error_in_fifty = [[1 - y if i % 50 == 0 else y for i, y in enumerate(labels)]] * 3  # 98% accuracy
    mine, theirs = [TaskRuns("accuracy", labels, perfect)], [TaskRuns("accuracy", labels, one_error_in_fifty)]
    verdict = paired_verdict(mine, theirs, same_seeds=True)
    assert verdict.word == BETTER and verdict.difference.estimate == pytest.approx(2.0)
    assert verdict.difference.low > 0  # unpaired, 600 examples at 98% would not separate 2 points this surely
    assert paired_verdict(theirs, mine, same_seeds=True).word == WORSE


def test_a_paired_comparison_needs_the_same_rows():
    with pytest.raises(ValueError, match="same tasks, metrics and labels"):
        paired_verdict([TaskRuns("accuracy", [0, 1], [[0, 1]])], [TaskRuns("accuracy", [1, 0], [[0, 1]])], True)


@given(st.lists(st.integers(0, 2), min_size=1, max_size=20))
def test_collapse_means_one_class_for_every_example(predictions):
    assert collapsed(predictions, is_regression=False) == (len(set(predictions)) == 1)
    assert not collapsed(predictions, is_regression=True)
