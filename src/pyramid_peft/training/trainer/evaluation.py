"""Evaluation during and after training: per-task metrics and their averages, logged as ``eval_<task>_<metric>``."""

from __future__ import annotations

import time

from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..evaluate import EvalSetup, Predictor, evaluate_tasks, flat_metrics


class PerTaskEvaluation:
    """Trainer mixin: ``evaluate`` scores every task's set (generation or heads, see :mod:`..evaluate`), so
    ``metric_for_best_model: paper_average`` selects the best checkpoint on the average.

    Reads ``self.eval_setup``; sets ``self.last_eval_results``.
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
        synced = is_deepspeed_zero3_enabled() or self.is_fsdp_enabled
        return Predictor.for_run(self.model, self.eval_setup, self.args, synced_gpus=synced)
