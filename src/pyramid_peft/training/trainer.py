"""The multi-task Trainer: stock ``Seq2SeqTrainer`` plus what multi-task routed adapters need.

* batches come from :class:`pyramid_peft.data.MultiTaskBatchSampler` (one task per batch, or mixed) and carry
  ``task_ids``, which the stock Trainer would drop because the base model's ``forward`` does not name it;
* the loss adds the method's auxiliary loss (:func:`pyramid_peft.aux_loss`), whose terms are logged;
* evaluation is per task (generation or heads, see :mod:`.evaluate`) and logs ``eval_<task>_<metric>``,
  ``eval_paper_average`` and ``eval_full_average``, so ``metric_for_best_model: paper_average`` selects the best
  checkpoint on the average;
* classification heads can have their own learning rate, and a heads model saves adapter + heads, not the whole
  frozen encoder.

Everything else (checkpoints, resume, TensorBoard, progress bars, DDP / FSDP / DeepSpeed through accelerate) is
the stock Trainer's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Seq2SeqTrainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from .. import aux_loss, uses_task_ids
from ..data import MultiTaskBatchSampler
from .config import SamplingSection
from .evaluate import EvalSet, Predictor, evaluate_tasks, flat_metrics
from .heads import MultiTaskClassifier

# Feature keys our datasets and collators use; the Trainer must not strip them.
FEATURE_KEYS = ("task_id", "task", "example", "task_ids")


class MultiTaskDataset(Dataset):
    """All tasks' training examples, indexed by ``(task index, example index)`` pairs as the sampler yields."""

    def __init__(self, task_names: list[str], examples: list[list[dict]]):
        self.task_names = task_names
        self.examples = examples

    def __len__(self) -> int:
        return sum(len(e) for e in self.examples)

    def __getitem__(self, index: tuple[int, int]) -> dict:
        task_id, example_id = index
        return {"task_id": task_id, "task": self.task_names[task_id], "example": self.examples[task_id][example_id]}


@dataclass
class EvalSetup:
    """How to evaluate: the per-task sets, the collator that builds eval inputs, and the model family."""

    sets: list[EvalSet]
    collator: object
    family: str


class MultiTaskTrainer(Seq2SeqTrainer):
    """A ``Seq2SeqTrainer`` for several tasks at once.

    Args:
        train_dataset: a :class:`MultiTaskDataset`.
        eval_setup: per-task evaluation sets and how to build their inputs.
        sampling: the task-sampling section of the config.
        head_learning_rate: learning rate of a heads model's heads (default: ``args.learning_rate``).
        Other arguments are the stock Trainer's.
    """

    def __init__(self, *args, eval_setup: EvalSetup, sampling: SamplingSection,
                 head_learning_rate: float | None = None, **kwargs):
        # The stock argument checks want an eval_dataset when evaluating during training; ours are per task.
        kwargs.setdefault("eval_dataset", {s.task.name: s.examples for s in eval_setup.sets})
        super().__init__(*args, **kwargs)
        self.eval_setup = eval_setup
        self.sampling = sampling
        self.head_learning_rate = head_learning_rate
        # Heads models pick heads by task id; adapters only get ids when their method routes by task.
        self.keeps_task_ids = isinstance(self.model, MultiTaskClassifier) or uses_task_ids(self.model)
        # The aux loss is a per-batch mean, so the task loss must be one too: the model must not normalise by the
        # token count of the whole accumulated batch, or the two terms would be scaled differently.
        self.model_accepts_loss_kwargs = False
        self._aux_totals: dict[str, float] = {}
        self._aux_count = 0
        self.last_eval_results: dict | None = None

    # -- data -------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        """Keep our feature keys: the stock check inspects the base model's ``forward``, which lacks them."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [k for k in FEATURE_KEYS if k not in self._signature_columns]

    def get_train_dataloader(self) -> DataLoader:
        """Endless batches from the multi-task sampler, which shards them across processes itself.

        The loader is not passed through ``accelerator.prepare``: that would shard the batches a second time.
        The Trainer moves each batch to the device, and on resume skips the batches already trained on, which
        the seeded sampler reproduces exactly.
        """
        dataset = self.train_dataset
        sampler = MultiTaskBatchSampler(
            [len(e) for e in dataset.examples],
            batch_size=self._train_batch_size,
            strategy=self.sampling.strategy,
            temperature=self.sampling.temperature,
            homogeneous=self.sampling.homogeneous,
            seed=self.args.seed,
            rank=self.args.process_index,
            world_size=self.args.world_size,
            drop_last=False,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    # -- loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss plus the method's auxiliary loss (whose terms are kept for the next log line)."""
        if not self.keeps_task_ids:
            inputs = {k: v for k, v in inputs.items() if k != "task_ids"}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        terms = aux_loss(self.accelerator.unwrap_model(model), breakdown=True)
        if terms:
            loss = loss + torch.stack([t.to(loss.device) for t in terms.values()]).sum()
            if model.training:
                self._record_aux(terms)
        return (loss, outputs) if return_outputs else loss

    def _record_aux(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self._aux_totals[name] = self._aux_totals.get(name, 0.0) + float(value.detach())
        self._aux_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean auxiliary-loss terms since the last training log as ``aux_<term>``."""
        if "loss" in logs and self._aux_count:
            logs.update({f"aux_{k}": v / self._aux_count for k, v in self._aux_totals.items()})
            self._aux_totals, self._aux_count = {}, 0
        super().log(logs, start_time)

    # -- optimizer --------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The stock optimizer, with a heads model's heads moved to groups at ``head_learning_rate``."""
        optimizer = super().create_optimizer(model)
        target = self.model if model is None else model
        if self.head_learning_rate is None or not isinstance(target, MultiTaskClassifier):
            return optimizer
        head_ids = {id(p) for p in target.heads.parameters()}
        for group in list(optimizer.param_groups):
            heads = [p for p in group["params"] if id(p) in head_ids]
            if heads:
                group["params"] = [p for p in group["params"] if id(p) not in head_ids]
                optimizer.add_param_group({**group, "params": heads, "lr": self.head_learning_rate})
        return optimizer

    # -- evaluation -------------------------------------------------------------------------------------------
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
        return Predictor(
            model=self.model,
            family=self.eval_setup.family,
            collator=self.eval_setup.collator,
            tokenizer=self.processing_class,
            batch_size=self.args.per_device_eval_batch_size,
            route_task_ids=self.keeps_task_ids,
            num_beams=self.args.generation_num_beams or 1,
            synced_gpus=is_deepspeed_zero3_enabled() or self.is_fsdp_enabled,
        )

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A heads model saves its adapter and heads; other models save as the stock Trainer does."""
        if not isinstance(self.model, MultiTaskClassifier):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        self.model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.model if model is None else model
        if isinstance(target, MultiTaskClassifier):
            target.load_trained(resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if isinstance(self.model, MultiTaskClassifier):
            self.model.load_trained(self.state.best_model_checkpoint)
        else:
            super()._load_best_model()
