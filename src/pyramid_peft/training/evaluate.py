"""Per-task evaluation: predictions for each task's evaluation examples, then its metrics beside its floor.

Text-to-text and causal models are scored on what they *generate* (greedy, a few tokens, as the EPT code does),
parsed back to a label by ``TaskSpec.parse_prediction``, or (``answer_scoring="likelihood"``) on which label word
they find most likely after the prompt; encoder models with heads are scored on the argmax (or the regression
output) of each example's head. Generation tasks are scored on the text ``generate`` writes (greedy or the task's
beams, up to its ``max_new_tokens``), the prompt cut off, against the target text. Under several processes every
rank predicts an equal share and the predictions are gathered, so all ranks return the same metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..metrics import average_scores, compute_metrics
from ..tasks import TaskSpec
from .answer_text import answer_text_predictions
from .heads import MultiTaskClassifier, forward_takes_task_ids

# What each kind's floor is: the score of a model that learned nothing usable for the task.
FLOOR_KINDS = {
    "classification": "majority class",
    "regression": "mean predictor",
    "multiple_choice": "chance",
    "generation": "untrained model",
}


@dataclass
class EvalSet:
    """One task's evaluation examples, its task id, and a description of the split they came from."""

    task: TaskSpec
    task_id: int
    examples: list[dict]
    split: str


@dataclass
class EvalSetup:
    """How to evaluate a run: the per-task sets, the collator that builds evaluation inputs (for causal models the
    generation collator), the tokenizer that decodes, the model family, and the answer scoring."""

    sets: list[EvalSet]
    collator: object
    tokenizer: object
    family: str
    answer_scoring: str = "generate"  # see DataSection


@dataclass
class Predictor:
    """What :func:`evaluate_tasks` needs to turn a batch of examples into predictions.

    Args:
        model: a ``MultiTaskClassifier`` (encoder family) or a PEFT model with ``generate``.
        family: ``seq2seq``, ``causal`` or ``encoder``.
        collator: builds model inputs from ``{"task_id", "task", "example"}`` features (for causal models: the
            generation collator, prompts only, left-padded).
        tokenizer: decodes generations.
        batch_size: examples per forward / generate call.
        num_beams: beams for generation (1 = greedy, the EPT setting).
        synced_gpus: keep ranks in step inside ``generate`` (DeepSpeed ZeRO-3, FSDP).
        answer_scoring: ``generate``, ``likelihood`` or ``answer_text`` (classification tasks of generative
            models; see :meth:`_most_likely_labels` and :mod:`pyramid_peft.training.answer_text`).
        by_length: batch examples of similar length together (sorted by the length of their input text), so
            that little of each batch is padding; predictions come back in the examples' order. Each example's
            prediction is the same either way, up to float rounding in the padded positions' masked sums.
    """

    model: nn.Module
    family: str
    collator: object
    tokenizer: object
    batch_size: int = 32
    num_beams: int = 1
    synced_gpus: bool = False
    answer_scoring: str = "generate"
    by_length: bool = True

    @classmethod
    def for_run(cls, model, setup: EvalSetup, args, synced_gpus: bool = False) -> Predictor:
        """The predictor of ``setup`` with the evaluation settings (batch size, beams) of training arguments
        ``args``; ``synced_gpus`` under DeepSpeed ZeRO-3 or FSDP."""
        return cls(
            model,
            setup.family,
            setup.collator,
            setup.tokenizer,
            batch_size=args.per_device_eval_batch_size,
            num_beams=args.generation_num_beams or 1,
            synced_gpus=synced_gpus,
            answer_scoring=setup.answer_scoring,
        )

    @torch.no_grad()
    def predict(self, eval_set: EvalSet, examples: list[dict]) -> list:
        """Predictions (label ids, scores, or None for an unparseable generation) for ``examples``, in their order.

        With ``by_length``, the examples are predicted in order of input length and put back in place.
        """
        if not self.by_length:
            return self._predict_in_order(eval_set, examples)
        order = sorted(range(len(examples)), key=lambda i: _input_length(eval_set.task, examples[i]))
        sorted_predictions = self._predict_in_order(eval_set, [examples[i] for i in order])
        predictions: list = [None] * len(examples)
        for position, prediction in zip(order, sorted_predictions):
            predictions[position] = prediction
        return predictions

    def _predict_in_order(self, eval_set: EvalSet, examples: list[dict]) -> list:
        predictions: list = []
        task = eval_set.task
        generative = self.family != "encoder"
        by_label = not (task.is_regression or task.is_generation)
        by_likelihood = generative and self.answer_scoring != "generate" and by_label
        generating = generative and not by_likelihood
        budget = answer_token_budget(task, self.tokenizer, self.family) if generating else 0
        beams = task.num_beams or self.num_beams
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            features = [{"task_id": eval_set.task_id, "task": eval_set.task.name, "example": ex} for ex in chunk]
            if by_likelihood and self.answer_scoring == "answer_text":
                predictions += self._most_likely_texts(chunk, eval_set)
                continue
            if by_likelihood:
                predictions += self._most_likely_labels(features, eval_set.task)
                continue
            batch = {k: v.to(_device(self.model)) for k, v in self.collator(features).items()}
            if self.family == "encoder":
                predictions += self._classify(batch)
            else:
                predictions += [task.parse_prediction(text) for text in self._generate(batch, budget, beams)]
        return predictions

    def _classify(self, batch: dict) -> list:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "task_ids") if k in batch}
        logits = self.model(**inputs).logits
        return _unwrap(self.model).predict(logits, batch["task_ids"])

    def _most_likely_labels(self, features: list[dict], task: TaskSpec) -> list[int]:
        """Per example, the label whose answer tokens have the highest summed log-probability after the prompt
        (for multiple choice, among the letters of the example's own options: ARC has 3 to 5).

        Each example is repeated once per label with that label's answer, batched as for training (the collator's
        ``for_scoring`` form), so prompt and answer are tokenized exactly as the model was trained on them. Special
        tokens around the answer (end of sequence, a BERT-style tokenizer's [CLS] / [SEP]) are not scored: only the
        label words compete. When every answer is
        one token (letters, yes / no), the first label's pass scores them all: the distribution at the answer
        position does not depend on the answer.
        """
        num_labels = len(task.label_words)
        candidates = [
            {**f, "example": {**f["example"], "label": label}} for f in features for label in range(num_labels)
        ]
        options = [len(f["example"]["choices"]) if task.multiple_choice else num_labels for f in features]
        batch = {k: v.to(_device(self.model)) for k, v in self.collator.for_scoring()(candidates).items()}
        if not forward_takes_task_ids(self.model):
            batch.pop("task_ids")
        targets = answer_targets(batch["labels"], self.family, self.tokenizer.all_special_ids)
        scored = targets != -100
        if (scored.sum(-1) == 1).all():
            answer_at = scored.float().argmax(-1)  # each row's one scored position
            tokens = targets.gather(-1, answer_at[:, None]).view(len(features), num_labels)
            logits = self._aligned_logits({k: v[::num_labels].contiguous() for k, v in batch.items()})
            first = logits[torch.arange(len(features), device=logits.device), answer_at[::num_labels]]
            scores = torch.log_softmax(first, -1).gather(-1, tokens)
        else:
            scores = answer_log_likelihood(self._aligned_logits(batch), targets).view(len(features), num_labels)
        offered = torch.arange(num_labels, device=scores.device) < torch.tensor(options, device=scores.device)[:, None]
        return scores.masked_fill(~offered, float("-inf")).argmax(-1).tolist()

    def _most_likely_texts(self, examples: list[dict], eval_set: EvalSet) -> list[int]:
        """Per example, the option whose text is most likely per character (``answer_scoring: answer_text``)."""
        task_ids = torch.full((len(examples),), eval_set.task_id) if forward_takes_task_ids(self.model) else None
        max_length = getattr(self.collator, "max_length", None) or getattr(self.collator, "max_source_length", None)
        return answer_text_predictions(
            self.model, self.tokenizer, self.family, eval_set.task, task_ids, examples, max_length
        )

    def _aligned_logits(self, batch: dict) -> torch.Tensor:
        """Logits whose position t scores target t of :func:`answer_targets` (float32)."""
        logits = self.model(**batch).logits.float()
        return logits[:, :-1] if self.family == "causal" else logits  # causal: position t predicts token t + 1

    def _generate(self, batch: dict, max_new_tokens: int, num_beams: int) -> list[str]:
        kwargs = {"task_ids": batch["task_ids"]} if forward_takes_task_ids(self.model) else {}
        output = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            synced_gpus=self.synced_gpus,
            pad_token_id=self.tokenizer.pad_token_id,
            **kwargs,
        )
        if self.family == "causal":  # the output repeats the (left-padded) prompt
            output = output[:, batch["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)


def _input_length(task: TaskSpec, example: dict) -> int:
    """Characters of the example's prompt (its text fields and their tags): a cheap stand-in for its token count,
    for sorting only."""
    return len(task.to_text_to_text(example)[0])


def answer_targets(labels: torch.Tensor, family: str, special_token_ids=()) -> torch.Tensor:
    """The answer tokens to score, aligned with :meth:`Predictor._aligned_logits`: ``labels`` (-100 elsewhere)
    shifted left by one for causal models, without the tokenizer's special tokens (the end of sequence after the
    answer, or the [CLS] / [SEP] a BERT-style tokenizer wraps it in): only the label words compete."""
    targets = (labels[:, 1:] if family == "causal" else labels).clone()
    special = torch.tensor(sorted(special_token_ids), dtype=targets.dtype, device=targets.device)
    return targets.masked_fill(torch.isin(targets, special), -100)


def answer_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the target tokens (-100 ignored)."""
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (log_probs * (targets != -100)).sum(-1)


def answer_token_budget(task: TaskSpec, tokenizer, family: str) -> int:
    """New tokens enough for the longest answer of ``task``, plus one for the end-of-sequence token; a generation
    task's own ``max_new_tokens``."""
    if task.is_generation:
        return task.max_new_tokens
    targets = task.score_targets() if task.is_regression else task.label_words
    prefix = " " if family == "causal" else ""  # causal answers follow the cue after a space
    longest = max(len(tokenizer(prefix + t, add_special_tokens=False)["input_ids"]) for t in targets)
    return longest + 1


def evaluate_tasks(predictor: Predictor, eval_sets: list[EvalSet], rank: int = 0, world_size: int = 1) -> dict:
    """``{task: {"split", "num_examples", "metrics", "floor", "floor_kind"[, "majority"]}}`` plus ``"paper_average"``
    and ``"full_average"``. A generation task's floor is None here: it is the untrained model's score
    (:func:`with_baseline_floors`)."""
    results: dict = {"tasks": {}}
    for eval_set in eval_sets:
        task = eval_set.task
        predictions, references = _predict_sharded(predictor, eval_set, rank, world_size)
        result = {
            "split": eval_set.split,
            "num_examples": len(references),
            "metrics": compute_metrics(task, predictions, references),
            "floor": floor_level(task, eval_set.examples, references),
            "floor_kind": FLOOR_KINDS[task.kind],
        }
        if not task.is_generation:
            result["majority"] = majority_level(task, references)
        results["tasks"][task.name] = result
    results.update(average_scores({name: r["metrics"] for name, r in results["tasks"].items()}))
    return results


def floor_level(task: TaskSpec, examples: list[dict], references: list) -> float | None:
    """The first metric of a model that learned nothing usable: the majority class (classification), the mean
    predictor (regression), chance (multiple choice: the mean of 1 / options); None for generation, whose floor is
    the untrained model's score (``ept eval --baseline``)."""
    if task.is_generation:
        return None
    if task.multiple_choice:
        expected = [1.0 / len(example["choices"]) for example in examples]
        return 100.0 * sum(expected) / len(expected)
    return majority_level(task, references)


def with_baseline_floors(results: dict, baseline: dict) -> dict:
    """``results`` with each generation task's floor set to its first metric in ``baseline`` (the untrained model's
    results on the same split, from ``ept eval --baseline``)."""
    for name, result in results["tasks"].items():
        base = baseline.get("tasks", {}).get(name)
        if result.get("floor_kind") == FLOOR_KINDS["generation"] and base and base["split"] == result["split"]:
            result["floor"] = base["metrics"]["paper"]
    return results


def _predict_sharded(predictor: Predictor, eval_set: EvalSet, rank: int, world_size: int) -> tuple[list, list]:
    """Each rank predicts every ``world_size``-th example; results are gathered in the original order.

    Shards are padded to equal length (repeating an example) so that every rank makes the same number of
    ``generate`` calls, which synchronised generation requires; the padding is dropped after gathering.
    """
    n = len(eval_set.examples)
    per_rank = math.ceil(n / world_size)
    indices = list(range(rank, n, world_size))
    indices += [indices[-1] if indices else 0] * (per_rank - len(indices))
    predictions = predictor.predict(eval_set, [eval_set.examples[i] for i in indices])
    pairs = list(zip(indices, predictions))
    if world_size > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    by_index = dict(pairs)
    ordered = sorted(by_index)
    return [by_index[i] for i in ordered], [eval_set.examples[i]["label"] for i in ordered]


def majority_level(task: TaskSpec, references: list) -> float:
    """The paper metric of a constant prediction: the most common label (the mean score for regression).

    That is the majority share of the labels for accuracy tasks, 0 for CoLA's MCC and STS-B's Pearson (both are 0
    for a constant prediction): a score at or below it means the model has learned nothing usable for the task.
    """
    if task.is_regression:
        constant = sum(references) / len(references)
    else:
        constant = Counter(references).most_common(1)[0][0]
    return compute_metrics(task, [constant] * len(references), references)["paper"]


AVERAGES_LEGEND = (
    'Averages over tasks: "paper" of each task\'s first metric (the one the EPT paper reports for the built-in '
    'tasks: accuracy; MCC for CoLA, Pearson for STS-B), "full" of each task\'s mean over all its metrics (adds F1 '
    "for MRPC and QQP, Spearman for STS-B). Metrics x 100; floor = the first metric of a model that learned nothing: "
    "the majority class (classification; CoLA MCC: 0), the mean predictor (regression; Pearson: 0), chance "
    "(multiple choice), the untrained model (generation: `ept eval RUN --baseline`; '-' until then)."
)


def metrics_table(results: dict) -> str:
    """A plain-text table of per-task metrics beside each task's floor, then the averages and a legend.

    ``floor`` is :func:`floor_level` of the task's evaluation set (results written before floors existed show
    their majority level, or "-"); ``vs floor`` is the paper metric minus it.
    """
    rows = [("task", "split", "n", "floor", "vs floor", "metrics")]
    for name, result in results["tasks"].items():
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items() if isinstance(v, (int, float)))
        level = result.get("floor", result.get("majority"))
        margin = "-" if level is None else f"{result['metrics']['paper'] - level:+.2f}"
        rows.append(
            (
                name,
                result["split"],
                str(result["num_examples"]),
                "-" if level is None else f"{level:.2f}",
                margin,
                metrics,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
    lines.append(f"paper average {results['paper_average']:.2f}   full average {results['full_average']:.2f}")
    lines.append(AVERAGES_LEGEND)
    return "\n".join(lines)


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """Trainer-style keys: ``eval_<task>_<metric>``, ``eval_paper_average``, ``eval_full_average``."""
    flat = {
        f"{prefix}_{task}_{metric}": float(value)
        for task, result in results["tasks"].items()
        for metric, value in result["metrics"].items()
        if isinstance(value, (int, float))
    }
    flat[f"{prefix}_paper_average"] = float(results["paper_average"])
    flat[f"{prefix}_full_average"] = float(results["full_average"])
    return flat


def _unwrap(model: nn.Module) -> MultiTaskClassifier:
    """The heads model inside a wrapper (under FSDP, the Trainer's ``model`` is the wrapped one)."""
    return model.module if hasattr(model, "module") else model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
