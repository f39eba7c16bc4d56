"""Task registry: prompts, label words and parsing of all twelve tasks, on real rows (docs/tasks.md)."""

import pytest

from pyramid_peft.data import load_examples
from pyramid_peft.tasks import TASK_NAMES, TaskSpec, UnknownTaskError, get_task

GLUE_TEMPLATES = {
    "cola": "cola sentence: {sentence1}",
    "sst2": "sst2 sentence: {sentence1}",
    "mrpc": "mrpc sentence1: {sentence1} sentence2: {sentence2}",
    "qqp": "qqp question1: {sentence1} question2: {sentence2}",
    "stsb": "stsb sentence1: {sentence1} sentence2: {sentence2}",
    "mnli": "mnli hypothesis: {sentence2} premise: {sentence1}",
    "qnli": "qnli question: {sentence1} sentence: {sentence2}",
    "rte": "rte sentence1: {sentence1} sentence2: {sentence2}",
}
LABEL_WORDS = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "stsb": (),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "boolq": ("no", "yes"),
    "openbookqa": ("A", "B", "C", "D"),
    "arc_easy": ("A", "B", "C", "D", "E"),
    "arc_challenge": ("A", "B", "C", "D", "E"),
}
MULTIPLE_CHOICE_PREFIXES = {"openbookqa": "openbookqa", "arc_easy": "arc", "arc_challenge": "arc"}


def first_train_row(task, data_dir):
    return load_examples(task, "train", data_dir)[0]


def test_task_names_and_order():
    assert TASK_NAMES == (
        "cola",
        "sst2",
        "mrpc",
        "qqp",
        "stsb",
        "mnli",
        "qnli",
        "rte",
        "boolq",
        "openbookqa",
        "arc_easy",
        "arc_challenge",
    )
    assert all(isinstance(get_task(name), TaskSpec) for name in TASK_NAMES)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_label_words_and_label_space(task):
    spec = get_task(task)
    assert spec.label_words == LABEL_WORDS[task]
    assert spec.num_labels == (1 if task == "stsb" else len(LABEL_WORDS[task]))
    assert spec.is_regression == (task == "stsb")
    assert spec.family == ("glue" if task in GLUE_TEMPLATES else "commonsense")


@pytest.mark.parametrize(
    "task, paper_metric, metrics",
    [
        ("cola", "mcc", ("mcc",)),
        ("stsb", "pearson", ("pearson", "spearman")),
        ("mrpc", "accuracy", ("accuracy", "f1")),
        ("qqp", "accuracy", ("accuracy", "f1")),
        ("sst2", "accuracy", ("accuracy",)),
        ("mnli", "accuracy", ("accuracy",)),
        ("qnli", "accuracy", ("accuracy",)),
        ("rte", "accuracy", ("accuracy",)),
        ("boolq", "accuracy", ("accuracy",)),
        ("openbookqa", "accuracy", ("accuracy",)),
        ("arc_easy", "accuracy", ("accuracy",)),
        ("arc_challenge", "accuracy", ("accuracy",)),
    ],
)
def test_metrics(task, paper_metric, metrics):
    assert get_task(task).paper_metric == paper_metric
    assert get_task(task).metrics == metrics


@pytest.mark.parametrize("task", list(GLUE_TEMPLATES))
def test_glue_formats_on_a_real_row(task, ept_data_dir):
    spec, row = get_task(task), first_train_row(task, ept_data_dir)
    source, target = spec.to_text_to_text(row)
    assert source == GLUE_TEMPLATES[task].format(**row)
    # The first STS-B training pair scores 5.0; label words of the rest are the EPT/MoRE code's.
    assert target == ("5.0" if task == "stsb" else LABEL_WORDS[task][row["label"]])
    assert spec.to_causal_lm(row) == (source + "\nAnswer:", " " + target)
    assert spec.to_classification(row) == (row["sentence1"], row["sentence2"], row["label"])


def test_exact_strings_of_known_rows(ept_data_dir):
    rte = get_task("rte").to_text_to_text(first_train_row("rte", ept_data_dir))
    assert rte == (
        "rte sentence1: No Weapons of Mass Destruction Found in Iraq Yet. "
        "sentence2: Weapons of Mass Destruction Found in Iraq.",
        "not_entailment",
    )
    obqa = get_task("openbookqa").to_text_to_text(first_train_row("openbookqa", ept_data_dir))
    assert obqa == (
        "openbookqa question: The sun is responsible for choices: (A) puppies learning new tricks "
        "(B) children growing up and getting old (C) flowers wilting in a vase "
        "(D) plants sprouting, blooming and wilting",
        "D",
    )


@pytest.mark.parametrize("task", list(MULTIPLE_CHOICE_PREFIXES))
def test_multiple_choice_formats_on_a_real_row(task, ept_data_dir):
    spec, row = get_task(task), first_train_row(task, ept_data_dir)
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip("ABCDE", row["choices"]))
    source, target = spec.to_text_to_text(row)
    assert source == f"{MULTIPLE_CHOICE_PREFIXES[task]} question: {row['question']} choices: {options}"
    assert target == "ABCDE"[row["label"]]
    assert spec.to_causal_lm(row) == (source + "\nAnswer:", " " + target)
    assert spec.to_classification(row) == (row["question"], options, row["label"])


def test_boolq_formats_on_a_real_row(ept_data_dir):
    spec, row = get_task("boolq"), first_train_row("boolq", ept_data_dir)
    assert row["passage"] == ""  # LLM-Adapters' BoolQ has no passage: the prompt leaves that part out
    assert spec.to_text_to_text(row) == (f"boolq question: {row['question']}", "yes" if row["label"] else "no")
    assert spec.to_classification(row) == (row["question"], None, row["label"])
    with_passage = {**row, "passage": "Persian is spoken in both."}
    assert spec.to_text_to_text(with_passage)[0] == (
        f"boolq passage: Persian is spoken in both. question: {row['question']}"
    )
    assert spec.to_classification(with_passage)[1] == "Persian is spoken in both."


@pytest.mark.parametrize("task", [name for name in TASK_NAMES if name != "stsb"])
def test_parse_prediction_round_trips_label_words(task):
    spec = get_task(task)
    for label_id, word in enumerate(spec.label_words):
        assert spec.parse_prediction(word) == label_id
        assert spec.parse_prediction(f"  {word.upper()}.\n") == label_id
        assert spec.parse_prediction(f"{word}!\nQuestion: next item") == label_id
    assert spec.parse_prediction("") is None
    assert spec.parse_prediction("something else") is None


def test_parse_prediction_is_strict():
    rte = get_task("rte")
    assert rte.parse_prediction("not_entailment") == 1
    assert rte.parse_prediction("entailment, I think") is None
    arc = get_task("arc_easy")
    assert arc.parse_prediction("(B)") == 1
    assert arc.parse_prediction("(B") == arc.parse_prediction("B)") == 1  # a 2-token budget cuts "(B)" to "(B"
    assert arc.parse_prediction("(BB)") is None and arc.parse_prediction("((B") is None
    assert arc.parse_prediction("b:") == 1
    # The reference's quirk took the first of a/b/c/d anywhere in the text; here such text is unparseable.
    assert arc.parse_prediction("The answer is B") is None


def test_stsb_targets_and_parsing():
    stsb = get_task("stsb")
    pair = {"idx": 0, "sentence1": "a", "sentence2": "b"}
    targets = {score: stsb.to_text_to_text({**pair, "label": score})[1] for score in (0.0, 3.47, 3.5, 4.75, 5.0)}
    assert targets == {0.0: "0.0", 3.47: "3.4", 3.5: "3.6", 4.75: "4.8", 5.0: "5.0"}
    assert stsb.to_text_to_text({**pair, "label": 0.5})[1] == "0.6"  # a tie on the 0.2 grid rounds up
    assert stsb.parse_prediction("3.4") == pytest.approx(3.4)
    assert stsb.parse_prediction(" 2.0.") == pytest.approx(2.0)
    assert stsb.parse_prediction("nan") is None
    assert stsb.parse_prediction("similar") is None


def test_unknown_task_lists_names_and_suggests():
    with pytest.raises(UnknownTaskError, match="Did you mean 'sst2'") as error:
        get_task("sst-2")
    assert isinstance(error.value, ValueError)
    assert all(name in str(error.value) for name in TASK_NAMES)
    assert get_task("RTE").name == "rte"
