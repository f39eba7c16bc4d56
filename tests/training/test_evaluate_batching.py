"""The Predictor's length batching (sort by length, batch, restore order) changes nothing but the speed: every
family's predictions equal those of batches in the examples' own order."""

import pytest
import torch

from pyramid_peft.training.config import from_dict
from pyramid_peft.training.evaluate import EvalSet, Predictor
from pyramid_peft.training.experiment import build_experiment, collators, load_splits


@pytest.mark.parametrize(
    ("family", "tasks", "scoring"),
    [
        ("encoder", ("rte", "stsb"), "generate"),
        ("seq2seq", ("rte", "stsb"), "generate"),
        ("causal", ("boolq",), "likelihood"),
    ],
)
def test_length_batching_gives_the_same_predictions_in_the_same_order(tiny_experiment, family, tasks, scoring):
    raw = tiny_experiment(family, method="lora", tasks=tasks)
    raw["data"].update(max_eval_examples=13, answer_scoring=scoring)
    experiment = build_experiment(from_dict(raw))
    model = experiment.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a random adapter and heads, so that predictions vary between examples
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)
    _, collator = collators(experiment)
    for task_id, (task, split) in enumerate(zip(experiment.tasks, load_splits(experiment))):
        eval_set = EvalSet(task, task_id, split.eval, "eval")
        runs = {
            by_length: Predictor(
                model,
                family,
                collator,
                experiment.tokenizer,
                batch_size=4,
                answer_scoring=scoring,
                by_length=by_length,
            ).predict(eval_set, split.eval)
            for by_length in (True, False)
        }
        if task.is_regression and family == "encoder":  # floats: padding changes the rounding of masked sums only
            assert runs[True] == pytest.approx(runs[False], abs=1e-5)
            assert len(set(runs[True])) > 1
        else:
            assert runs[True] == runs[False]


def test_length_batching_sorts_each_batch_by_input_length(tiny_experiment):
    experiment = build_experiment(from_dict(tiny_experiment("encoder", method="lora", tasks=("rte",))))
    seen = []

    class Recorder:
        def __call__(self, features):
            seen.append([len(f["example"]["sentence1"]) + len(f["example"]["sentence2"]) for f in features])
            return collators(experiment)[1](features)

    split = load_splits(experiment)[0]
    predictor = Predictor(experiment.model.eval(), "encoder", Recorder(), experiment.tokenizer, batch_size=2)
    predictor.predict(EvalSet(experiment.tasks[0], 0, split.eval, "eval"), split.eval)
    lengths = [length for batch in seen for length in batch]
    assert lengths == sorted(lengths) and len(lengths) == len(split.eval)
