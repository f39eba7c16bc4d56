"""``TaskSpec`` and its data locations (``LocalFiles``, ``HubSource``), on hand-made examples."""

import dataclasses

import pytest

from pyramid_peft.tasks import HubSource, LocalFiles, TaskSpec, get_task
from pyramid_peft.tasks.spec import format_stsb_score

PAIR = TaskSpec(
    name="pair",
    family="glue",
    prompt_prefix="pair",
    label_words=("no", "yes"),
    paper_metric="accuracy",
    metrics=("accuracy",),
    fields=(("first", "sentence1"), ("second", "sentence2")),
    title="PAIR",
    local=LocalFiles("pair-dir", (("train", "t.jsonl"), ("validation", "v.jsonl"))),
    hub=HubSource("someone/pair", None, (("train", "train"), ("validation", "dev"), ("test", "test")), ("a", "b")),
)


def test_local_files_and_hub_source_name_their_splits():
    assert PAIR.local.file_name("validation") == "v.jsonl" and PAIR.local.file_name("test") is None
    assert PAIR.local.splits == ("train", "validation")
    assert PAIR.hub.hub_split("validation") == "dev" and PAIR.hub.hub_split("heldout") is None
    assert PAIR.hub.split_names == ("train", "validation", "test")
    assert PAIR.splits == ("train", "validation", "test")  # local first, each once


def test_a_spec_without_sources_has_no_splits_and_title_defaults_to_the_name():
    bare = dataclasses.replace(PAIR, local=None, hub=None, title="")
    assert bare.splits == () and bare.display_name == "pair" and PAIR.display_name == "PAIR"


def test_specs_stay_hashable():
    assert len({PAIR, dataclasses.replace(PAIR), get_task("rte")}) == 2


def test_renderings_follow_the_fields_in_prompt_order():
    example = {"idx": 0, "sentence1": "It rains.", "sentence2": "It is wet.", "label": 1}
    assert PAIR.to_text_to_text(example) == ("pair first: It rains. second: It is wet.", "yes")
    assert PAIR.to_causal_lm(example) == ("pair first: It rains. second: It is wet.\nAnswer:", " yes")
    assert PAIR.to_classification(example) == ("It rains.", "It is wet.", 1)
    assert PAIR.num_labels == 2


@pytest.mark.parametrize("text, parsed", [("yes", 1), (" No.\nmore", 0), ("yes indeed", None), ("", None)])
def test_parse_prediction_takes_the_first_line_and_nothing_inside_longer_text(text, parsed):
    assert PAIR.parse_prediction(text) == parsed


def test_stsb_scores_round_to_the_nearest_fifth_with_ties_up():
    assert [format_stsb_score(s) for s in (3.47, 0.1, 0.5, 5.0)] == ["3.4", "0.2", "0.6", "5.0"]


@pytest.mark.parametrize(
    "task, small",
    [
        ("cola", True),
        ("stsb", True),
        ("mrpc", True),
        ("rte", True),
        ("sst2", False),
        ("qnli", False),
        ("mnli", False),
        ("qqp", False),
    ],
)
def test_the_small_tasks_are_the_four_the_protocols_halve(task, small):
    assert get_task(task).small == small


def test_built_in_tasks_name_their_local_files_and_hub_copies():
    assert get_task("arc_easy").local.folder == "ARC-Easy"
    assert get_task("mnli").hub.hub_split("validation") == "validation_matched"
    assert get_task("qqp").local.file_name("heldout") == "heldout_from_train.jsonl"
    assert get_task("boolq").hub.columns == ("question", "passage")
    assert get_task("sst2").title == "SST-2"


def test_the_kind_is_stated_or_follows_the_old_flags_and_the_first_metric_is_averaged():
    assert [get_task(name).kind for name in ("rte", "stsb", "boolq", "arc_easy")] == [
        "classification",
        "regression",
        "classification",
        "multiple_choice",
    ]
    assert TaskSpec("t", is_regression=True, metrics=("spearman", "pearson")).paper_metric == "spearman"
    with pytest.raises(ValueError, match="kind 'ranking' is not one of"):
        TaskSpec("t", kind="ranking")


def test_scores_render_at_any_step_with_ties_up_and_stsb_keeps_its_26_targets():
    half_steps = TaskSpec("t", kind="regression", score_range=(1.0, 3.0), score_step=0.5, score_decimals=1)
    assert [half_steps.format_score(s) for s in (1.2, 1.25, 2.74, 2.75)] == ["1.0", "1.5", "2.5", "3.0"]
    assert half_steps.score_targets() == ("1.0", "1.5", "2.0", "2.5", "3.0")
    assert get_task("stsb").score_targets() == tuple(f"{i / 5:.1f}" for i in range(26))


def test_a_template_is_the_whole_prompt_and_generation_predicts_its_text():
    spec = TaskSpec("t", kind="generation", prompt="Q: {q}\nA:")
    example = {"q": "two plus two", "label": "four"}
    assert spec.to_causal_lm(example) == ("Q: two plus two\nA:", " four")
    assert TaskSpec("t", kind="generation", prompt="Q: {q}\n").to_causal_lm(example)[1] == "four"
    assert spec.parse_prediction("  four\nand more ") == "four\nand more"
