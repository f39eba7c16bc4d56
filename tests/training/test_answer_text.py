"""Answer-text scoring (``answer_scoring: answer_text``, lm-evaluation-harness's ``acc_norm``): each option's
log-likelihood after the cloze prompt, per character, against a reference computed one unpadded sequence at a time."""

import pytest
import torch

from pyramid_peft.tasks import get_task
from pyramid_peft.training.answer_text import answer_text_scores, cloze_prompt
from pyramid_peft.training.evaluate import EvalSet
from pyramid_peft.training.experiment import load_splits


def test_the_cloze_prompt_leaves_the_options_out():
    example = {"question": "Which is a metal?", "passage": None, "choices": ["iron", "wood"], "label": 0}
    assert cloze_prompt(get_task("arc_easy"), example, "causal") == "arc question: Which is a metal?\nAnswer:"
    assert cloze_prompt(get_task("arc_easy"), example, "seq2seq") == "arc question: Which is a metal?"


def reference_scores(model, tokenizer, family, prompt, options, task_id):
    """log p(option's text | prompt) / its characters, for each option alone (no padding, no batching)."""
    scores = []
    for option in options:
        continuation = " " + option if family == "causal" else option
        if family == "causal":
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt_ids + answer_ids]), task_ids=torch.tensor([task_id])).logits
            positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
        else:
            target_ids = tokenizer(continuation)["input_ids"]
            logits = model(
                input_ids=torch.tensor([tokenizer(prompt)["input_ids"]]),
                labels=torch.tensor([target_ids]),
                task_ids=torch.tensor([task_id]),
            ).logits
            special = set(tokenizer.all_special_ids)
            positions = [p for p, t in enumerate(target_ids) if t not in special]
            answer_ids = [target_ids[p] for p in positions]
        log_probs = torch.log_softmax(logits[0].double(), -1)
        scores.append(sum(log_probs[p, t].item() for p, t in zip(positions, answer_ids)) / len(continuation))
    return scores


@pytest.mark.parametrize(("family", "tasks"), [("causal", ("arc_easy", "boolq")), ("seq2seq", ("rte", "openbookqa"))])
def test_answer_text_scores_match_the_reference_and_pick_its_argmax(scoring_experiment, family, tasks):
    experiment, predictor = scoring_experiment(family, tasks, "answer_text")
    model, tokenizer = experiment.model, experiment.tokenizer
    for task_id, (task, split) in enumerate(zip(experiment.tasks, load_splits(experiment))):
        examples = split.eval[:6]
        with torch.no_grad():
            scores = answer_text_scores(
                model, tokenizer, family, task, torch.full((6,), task_id), examples, max_length=1024
            )
            reference = [
                reference_scores(
                    model,
                    tokenizer,
                    family,
                    cloze_prompt(task, ex, family),
                    ex.get("choices") or task.label_words,
                    task_id,
                )
                for ex in examples
            ]
            predicted = predictor.predict(EvalSet(task, task_id, examples, "eval"), examples)
        assert [len(s) for s in scores] == [len(r) for r in reference]
        torch.testing.assert_close(
            torch.tensor(sum(scores, [])), torch.tensor(sum(reference, [])).float(), atol=1e-4, rtol=1e-4
        )
        assert predicted == [max(range(len(r)), key=r.__getitem__) for r in reference]
