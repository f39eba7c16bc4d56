"""Answer scoring by likelihood: the label word a generative model finds most likely, against a reference computed
one prompt and one answer at a time."""

import pytest
import torch

from pyramid_peft.tasks import get_task
from pyramid_peft.training.config import ConfigError, from_dict
from pyramid_peft.training.evaluate import EvalSet, Predictor, answer_log_likelihood, answer_targets
from pyramid_peft.training.experiment import build_experiment, collators, load_splits


def test_targets_shift_for_causal_models_and_drop_special_tokens():
    labels = torch.tensor([[-100, 3, 5, 2], [-100, -100, 4, -100], [7, 4, 8, -100]])  # EOS 2; [CLS] 7, [SEP] 8
    assert answer_targets(labels, "seq2seq", [2]).tolist() == [
        [-100, 3, 5, -100],
        [-100, -100, 4, -100],
        [7, 4, 8, -100],
    ]
    assert answer_targets(labels, "causal", [2, 7, 8]).tolist() == [[3, 5, -100], [-100, 4, -100], [4, -100, -100]]
    assert answer_targets(labels, "seq2seq").tolist() == labels.tolist()


def test_log_likelihood_sums_the_target_tokens():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[3, 5, -100], [-100, 4, -100]])
    log_probs = torch.log_softmax(logits, -1)
    expected = torch.stack([log_probs[0, 0, 3] + log_probs[0, 1, 5], log_probs[1, 1, 4]])
    torch.testing.assert_close(answer_log_likelihood(logits, targets), expected)


def reference_scores(model, tokenizer, family, task, example, task_id, route):
    """Summed log-probability of each label's answer tokens, one unpadded sequence per label (for multiple choice,
    per option the example has)."""
    scores = []
    for label in range(len(example["choices"]) if task.multiple_choice else len(task.label_words)):
        candidate = {**example, "label": label}
        kwargs = {"task_ids": torch.tensor([task_id])} if route else {}
        if family == "causal":
            prompt, answer = task.to_causal_lm(candidate)
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt_ids + answer_ids]), **kwargs).logits[0]
            positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
        else:
            source, target = task.to_text_to_text(candidate)
            target_ids = tokenizer(target)["input_ids"]  # as trained: with the tokenizer's special tokens
            labels = torch.tensor([target_ids])
            logits = model(input_ids=torch.tensor([tokenizer(source)["input_ids"]]), labels=labels, **kwargs).logits[0]
            special = set(tokenizer.all_special_ids)
            positions = [p for p, t in enumerate(target_ids) if t not in special]  # only the label words compete
            answer_ids = [target_ids[p] for p in positions]
        log_probs = torch.log_softmax(logits.float(), -1)
        scores.append(sum(log_probs[p, t] for p, t in zip(positions, answer_ids)).item())
    return scores


@pytest.mark.parametrize(("family", "tasks"), [("causal", ("arc_easy", "boolq")), ("seq2seq", ("rte", "sst2"))])
def test_likelihood_scoring_picks_the_reference_argmax(scoring_experiment, family, tasks):
    experiment, predictor = scoring_experiment(family, tasks, "likelihood")
    model, tokenizer = experiment.model, experiment.tokenizer
    for task_id, (task, split) in enumerate(zip(experiment.tasks, load_splits(experiment))):
        examples = split.eval[:6]
        if task.multiple_choice:  # options the label words cover but this example lacks are never chosen
            examples = [{**ex, "choices": ex["choices"][:2], "label": ex["label"] % 2} for ex in examples]
        with torch.no_grad():
            predicted = predictor.predict(EvalSet(task, task_id, examples, "eval"), examples)
            expected = [
                max(range(len(scores)), key=scores.__getitem__)
                for scores in (reference_scores(model, tokenizer, family, task, ex, task_id, True) for ex in examples)
            ]
        assert predicted == expected


def test_regression_is_still_generated_and_unknown_scoring_is_refused(tiny_experiment):
    raw = tiny_experiment("seq2seq", tasks=("stsb",))
    raw["data"]["answer_scoring"] = "likelihood"
    experiment = build_experiment(from_dict(raw))
    _, collator = collators(experiment)
    predictor = Predictor(
        experiment.model.eval(), "seq2seq", collator, experiment.tokenizer, answer_scoring="likelihood"
    )
    examples = load_splits(experiment)[0].eval[:2]
    predictions = predictor.predict(EvalSet(get_task("stsb"), 0, examples, "eval"), examples)
    assert all(p is None or isinstance(p, float) for p in predictions)
    raw["data"]["answer_scoring"] = "logprob"
    with pytest.raises(ConfigError, match=r"data.answer_scoring='logprob' is not one of: generate, likelihood"):
        from_dict(raw)


def test_majority_level_is_the_score_of_always_predicting_the_most_common_label():
    from pyramid_peft.tasks import get_task
    from pyramid_peft.training.evaluate import majority_level

    assert majority_level(get_task("sst2"), [1, 1, 0, 1]) == pytest.approx(75.0)
    assert majority_level(get_task("mnli"), [2, 0, 2, 1, 2]) == pytest.approx(60.0)
    assert majority_level(get_task("cola"), [1, 1, 0]) == 0.0  # MCC of a constant prediction
    assert majority_level(get_task("stsb"), [0.4, 3.2, 5.0]) == 0.0  # Pearson of a constant prediction


def test_metrics_table_prints_the_floor_and_margin_beside_each_score_and_a_legend():
    from pyramid_peft.training.evaluate import metrics_table

    results = {
        "tasks": {
            "rte": {
                "split": "validation[:139]",
                "num_examples": 139,
                "majority": 52.52,
                "metrics": {"accuracy": 60.0, "paper": 60.0},
            },
            "cola": {"split": "validation", "num_examples": 10, "metrics": {"mcc": 3.0, "paper": 3.0}},
            "arc_easy": {
                "split": "test",
                "num_examples": 8,
                "majority": 37.5,
                "floor": 25.0,
                "floor_kind": "chance",
                "metrics": {"accuracy": 50.0, "paper": 50.0},
            },
            "echo": {
                "split": "train[2 rows, seed 2026] (validation carved from train)",
                "num_examples": 2,
                "floor": None,
                "floor_kind": "untrained model",
                "metrics": {"exact_match": 50.0, "paper": 50.0},
            },
        },
        "paper_average": 31.5,
        "full_average": 31.5,
    }
    lines = metrics_table(results).splitlines()
    assert lines[0].split()[:5] == ["task", "split", "n", "floor", "vs"]
    assert lines[1].split()[:5] == ["rte", "validation[:139]", "139", "52.52", "+7.48"]  # an older file: majority
    assert lines[2].split()[3:5] == ["-", "-"]  # an older results file without majority levels
    assert lines[3].split()[3:5] == ["25.00", "+25.00"]  # multiple choice: chance, not the majority
    assert lines[4].split()[:2] == ["echo", "train[2"] and lines[4].split()[10:12] == ["-", "-"]  # no baseline yet
    assert "paper average 31.50" in lines[5] and "majority" in lines[6] and "MCC" in lines[6]


def test_evaluate_tasks_records_each_tasks_majority_level_from_its_evaluation_labels():
    from pyramid_peft.training.evaluate import evaluate_tasks

    class Constant:
        def predict(self, eval_set, examples):
            return [0] * len(examples)

    examples = [{"sentence1": "a", "sentence2": None, "label": label} for label in (1, 1, 1, 0)]
    results = evaluate_tasks(Constant(), [EvalSet(get_task("sst2"), 0, examples, "validation")])
    assert results["tasks"]["sst2"]["majority"] == pytest.approx(75.0)
    assert results["tasks"]["sst2"]["metrics"]["accuracy"] == pytest.approx(25.0)
