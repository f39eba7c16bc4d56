"""Metrics against values computed by hand, unparseable predictions, and the averages."""

import math

import pytest

from pyramid_peft.metrics import accuracy, average_scores, compute_metrics, f1_binary, matthews_corr, pearson, spearman
from pyramid_peft.tasks import get_task

# Confusion counts of these lists: TP 4 (positions 0, 4, 6, 7), FP 1 (1), TN 2 (2, 3), FN 1 (5).
PREDICTIONS = [1, 1, 0, 0, 1, 0, 1, 1]
REFERENCES = [1, 0, 0, 0, 1, 1, 1, 1]
TP, FP, TN, FN = 4, 1, 2, 1


def test_accuracy():
    assert accuracy(PREDICTIONS, REFERENCES) == (TP + TN) / 8
    assert accuracy([0, 2, None], [0, 2, 1]) == 2 / 3


def test_matthews_correlation_by_hand():
    expected = (TP * TN - FP * FN) / math.sqrt((TP + FP) * (TP + FN) * (TN + FP) * (TN + FN))
    assert expected == pytest.approx(7 / 15)
    assert matthews_corr(PREDICTIONS, REFERENCES) == pytest.approx(expected)
    assert matthews_corr([1, 1, 1], [1, 0, 1]) == 0.0  # undefined for a constant prediction


def test_f1_by_hand():
    precision, recall = TP / (TP + FP), TP / (TP + FN)
    assert f1_binary(PREDICTIONS, REFERENCES) == pytest.approx(2 * precision * recall / (precision + recall))
    assert f1_binary([0, 0], [1, 0]) == 0.0


def test_unparseable_predictions_count_as_wrong():
    # None on a positive reference becomes a false negative, on a negative one a false positive.
    assert f1_binary([None, None, 1], [1, 0, 1]) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    # [None, 1, 0, 1, 1] vs [1, 1, 0, 0, 1] scores as [0, 1, 0, 1, 1]: TP 2, FP 1, TN 1, FN 1.
    assert matthews_corr([None, 1, 0, 1, 1], [1, 1, 0, 0, 1]) == pytest.approx(
        (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2)
    )
    assert accuracy([None, 1], [1, 1]) == 0.5


def test_pearson_by_hand():
    # x = 1..4, y = 2, 4, 5, 9: deviations (-1.5, -0.5, 0.5, 1.5) and (-3, -1, 0, 4).
    covariance = -1.5 * -3 + -0.5 * -1 + 0.5 * 0 + 1.5 * 4  # 11
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(covariance / math.sqrt(5 * 26))


def test_spearman_by_hand():
    # Ranks 1, 2, 3, 4 against 1, 3, 2, 4: squared rank differences sum to 2.
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(1 - 6 * 2 / (4 * (4**2 - 1)))


def test_stsb_unparseable_becomes_zero_and_constant_predictions_score_zero():
    # Predictions 0, 2, 3 against 1, 2, 3: deviations (-5/3, 1/3, 4/3) and (-1, 0, 1).
    assert pearson([None, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(3 / math.sqrt(42 / 9 * 2))
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([None, None, None], [1.0, 2.0, 3.0]) == 0.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions and 3 references"):
        accuracy([0, 1], [0, 1, 1])


def test_compute_metrics_scales_and_adds_the_paper_metric():
    mrpc = compute_metrics("mrpc", PREDICTIONS, REFERENCES)
    assert mrpc == pytest.approx({"accuracy": 75.0, "f1": 80.0, "paper": 75.0})
    cola = compute_metrics(get_task("cola"), PREDICTIONS, REFERENCES)
    assert cola == pytest.approx({"mcc": 700 / 15, "paper": 700 / 15})
    stsb = compute_metrics("stsb", [1, 2, 3, 4], [10, 30, 20, 40])
    assert stsb["paper"] == stsb["pearson"] and set(stsb) == {"pearson", "spearman", "paper"}


def test_compute_metrics_parses_generated_text():
    scores = compute_metrics("rte", ["Entailment.", "not_entailment", "maybe"], [0, 1, 0])
    assert scores["accuracy"] == pytest.approx(200 / 3)
    assert compute_metrics("stsb", ["1.0", "2.0", "oops"], [1.0, 2.0, 3.0])["pearson"] == pytest.approx(
        100 * pearson([1.0, 2.0, 0.0], [1.0, 2.0, 3.0])
    )


def test_average_scores():
    per_task = {
        "mrpc": {"accuracy": 80.0, "f1": 90.0, "paper": 80.0},
        "cola": {"mcc": 50.0, "paper": 50.0},
        "stsb": {"pearson": 88.0, "spearman": 86.0, "paper": 88.0},
    }
    averages = average_scores(per_task)
    assert averages["paper_average"] == pytest.approx((80 + 50 + 88) / 3)
    assert averages["full_average"] == pytest.approx((85 + 50 + 87) / 3)
    with pytest.raises(ValueError, match="at least one task"):
        average_scores({})


def test_exact_match_normalises_case_punctuation_articles_and_spaces():
    from pyramid_peft.metrics import exact_match, normalize_answer

    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert exact_match(["The cat.", "a dog", "cats", None], ["cat", "Dog", "cat", "cat"]) == pytest.approx(0.5)


def test_rouge_l_is_the_longest_common_subsequence_f_measure_by_hand():
    from pyramid_peft.metrics import rouge_l

    # LCS("the cat sat", "the cat sat down") = 3 words: precision 3/3, recall 3/4, F = 2PR / (P + R) = 6/7.
    # LCS("a b c d", "d c b a") = 1: P = R = 1/4.
    assert rouge_l(["the cat sat", "a b c d"], ["the cat sat down", "d c b a"]) == pytest.approx((6 / 7 + 1 / 4) / 2)


def test_chrf_is_one_for_identical_text_and_zero_for_no_shared_character():
    from pyramid_peft.metrics import chrf

    assert chrf(["hello world"], ["hello world"]) == pytest.approx(1.0)
    assert chrf(["xyz"], ["abc"]) == 0.0
    assert 0 < chrf(["hello word"], ["hello world"]) < 1


def test_generation_metrics_score_generated_text_and_average_the_first():
    from pyramid_peft.tasks.declare import declare_task

    task = declare_task(
        {
            "name": "qa",
            "kind": "generation",
            "data": {"train": "qa.jsonl"},
            "prompt": "{q}",
            "target": "a",
            "metrics": ["rouge_l", "exact_match"],
        }
    )
    scores = compute_metrics(task, ["  Paris\n", "the river"], ["paris", "a river bank"])
    assert scores["exact_match"] == pytest.approx(50.0) and scores["paper"] == scores["rouge_l"]
