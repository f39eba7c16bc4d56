"""Evaluation during and after training: per-task metrics and their averages, logged as ``eval_<task>_<metric>``."""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..evaluate import EvalSet, Predictor, evaluate_tasks, flat_metrics


@dataclass
class EvalSetup:
    """How to evaluate: the per-task sets, the collator that builds eval inputs, and the model family."""

    sets: list[EvalSet]
    collator: object
    family: str
    answer_scoring: str = "generate"  # see DataSection


class PerTaskEvaluation:
    """Trainer mixin: ``evaluate`` scores every task's set (generation or heads, see :mod:`..evaluate`), so
    ``metric_for_best_model: paper_average`` selects the best checkpoint on the average.

    Reads ``self.eval_setup`` and ``self.keeps_task_ids``; sets ``self.last_eval_results``.
    """

    eval_setup: EvalSetup

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-task metrics and their averages on the evaluation sets (``eval_dataset`` is not used)."""
        start = time.time()
        self.model.eval()
        results = evaluate_tasks(self._predictor(), self.eval_setup.sets, self.args.process_index, self.args.world_size)
        metrics = flat_metrics(results, metric_key_prefix)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 2)
        self.last_eval_results = results
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _predictor(self) -> Predictor:
        setup = self.eval_setup
        return Predictor.for_run(
            self.model,
            setup.family,
            setup.collator,
            self.processing_class,
            self.args,
            self.keeps_task_ids,
            synced_gpus=is_deepspeed_zero3_enabled() or self.is_fsdp_enabled,
            answer_scoring=setup.answer_scoring,
        )
