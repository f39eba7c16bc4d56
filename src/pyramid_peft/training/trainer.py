"""The multi-task Trainer: stock ``Seq2SeqTrainer`` plus what multi-task routed adapters need.

* batches come from :class:`pyramid_peft.data.MultiTaskBatchSampler` (one task per batch, or mixed) and carry
  ``task_ids``, which the stock Trainer would drop because the base model's ``forward`` does not name it;
* the loss adds the method's auxiliary loss (:func:`pyramid_peft.aux_loss`), whose terms are logged;
* evaluation is per task (generation or heads, see :mod:`.evaluate`) and logs ``eval_<task>_<metric>``,
  ``eval_paper_average`` and ``eval_full_average``, so ``metric_for_best_model: paper_average`` selects the best
  checkpoint on the average;
* classification heads can have their own learning rate, and a heads model saves adapter + heads, not the whole
  frozen encoder.

* checkpoints are written atomically with a manifest and the sampler state, resuming skips a partial or corrupt one
  (:mod:`.checkpoints`), SIGTERM / Ctrl-C save a checkpoint and stop, and a non-finite loss stops the run before
  it changes any weights (:mod:`.guards`); every process takes these decisions at the same step.

Everything else (checkpoint contents, TensorBoard, progress bars, DDP / FSDP / DeepSpeed through accelerate) is
the stock Trainer's.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Seq2SeqTrainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .. import aux_loss
from ..atomic import publish_directory
from ..data import MultiTaskBatchSampler
from .checkpoints import (
    SAMPLER_STATE_FILE,
    CheckpointError,
    newest_valid_checkpoint,
    resolve_resume,
    staging_folder,
    write_manifest,
)
from .config import SamplingSection
from .evaluate import EvalSet, Predictor, evaluate_tasks, flat_metrics
from .guards import NonFiniteLossError, StopSignals, TrainingInterrupted
from .heads import MultiTaskClassifier, needs_task_ids

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
    answer_scoring: str = "generate"  # see DataSection


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
        self.keeps_task_ids = needs_task_ids(self.model)
        # The aux loss is a per-batch mean, so the task loss must be one too: the model must not normalise by the
        # token count of the whole accumulated batch, or the two terms would be scaled differently.
        self.model_accepts_loss_kwargs = False
        self._aux_totals: dict[str, float] = {}
        self._aux_count = 0
        self.last_eval_results: dict | None = None
        self._train_sampler: MultiTaskBatchSampler | None = None
        self._resume_checkpoint: str | None = None
        self._signals = StopSignals()
        self._agreed_signal: int | None = None
        self._staging_root: Path | None = None

    # -- data -------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        """Keep our feature keys: the stock check inspects the base model's ``forward``, which lacks them."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [k for k in FEATURE_KEYS if k not in self._signature_columns]

    def get_train_dataloader(self) -> DataLoader:
        """Endless batches from the multi-task sampler, which shards them across processes itself.

        The loader is not passed through ``accelerator.prepare``: that would shard the batches a second time.
        The Trainer moves each batch to the device, and on resume skips the batches already trained on, which
        the seeded sampler reproduces exactly (accelerate skips them in the batch sampler: none is collated).
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
        self._check_sampler_matches_checkpoint(sampler)
        self._train_sampler = sampler
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    def _check_sampler_matches_checkpoint(self, sampler: MultiTaskBatchSampler) -> None:
        """Refuse to resume with other sampling settings than the checkpoint's: the batches would silently differ."""
        if self._resume_checkpoint is None:
            return
        path = Path(self._resume_checkpoint) / SAMPLER_STATE_FILE
        if not path.is_file():  # save_only_model checkpoints hold weights only; the stock resume reports that
            return
        try:
            sampler.check_compatible(json.loads(path.read_text()))
        except ValueError as err:
            raise CheckpointError(
                f"cannot resume from {self._resume_checkpoint}: {err} Resume with the run's original tasks, batch "
                "size, sampling settings, seed and number of processes."
            ) from err

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

    # -- stopping ---------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Stock training that resumes only from a complete checkpoint and stops cleanly on SIGTERM or Ctrl-C.

        Raises :class:`TrainingInterrupted` after such a stop (its checkpoint saved), :class:`NonFiniteLossError`
        on a NaN or infinite loss, and :class:`CheckpointError` when there is no valid checkpoint to resume from.
        """
        self._resume_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self._agreed_signal = None
        with self._signals:
            output = super().train(resume_from_checkpoint=self._resume_checkpoint, trial=trial, **kwargs)
        signum = self._agreed_signal or self._signals.received  # received after the last step: nothing to agree on
        if signum:
            raise TrainingInterrupted(signum, self.state.global_step, newest_valid_checkpoint(self.args.output_dir))
        return output

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The stock step (forward and backward), then a check that every process passes before the update."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._agree_on_stopping(loss)
        return loss

    def _agree_on_stopping(self, loss: torch.Tensor) -> None:
        """Stop on every process at once: at a non-finite loss anywhere, before the optimizer uses its gradients;
        after a stop signal anywhere, at the end of this step, with a checkpoint.

        One gather per step: without it, a process that stops alone leaves the others waiting for it forever.
        """
        mine = torch.stack([loss.detach().float().reshape(()),
                            torch.tensor(float(self._signals.received or 0), device=loss.device)])
        everyone = self.accelerator.gather(mine[None])  # (processes, 2): loss, signal number
        losses, signals = everyone[:, 0], everyone[:, 1]
        if not torch.isfinite(losses).all():
            bad = losses[~torch.isfinite(losses)][0].item()
            raise NonFiniteLossError(self.state.global_step + 1, bad, newest_valid_checkpoint(self.args.output_dir))
        if signals.any():
            self._agreed_signal = int(signals.max())
            self.control.should_save = True
            self.control.should_training_stop = True

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
        setup = self.eval_setup
        return Predictor.for_run(self.model, setup.family, setup.collator, self.processing_class, self.args,
                                 self.keeps_task_ids, synced_gpus=is_deepspeed_zero3_enabled() or self.is_fsdp_enabled,
                                 answer_scoring=setup.answer_scoring)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        """The run folder; while :meth:`_save_checkpoint` runs the stock save, the staging folder instead."""
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint plus the sampler state, made atomic: written into a staging folder (the stock save,
        pointed there, on every process), completed by a manifest, then renamed to ``checkpoint-<step>``."""
        checkpoint = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with self._staged(checkpoint) as staging:
            self._staging_root = staging.parent
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            self.accelerator.wait_for_everyone()  # every process's RNG state is in before the manifest
            if self.args.should_save:
                self._complete_checkpoint(staging, checkpoint)
        if self.args.should_save:
            rotate_checkpoints(str(checkpoint.parent), self.args.save_total_limit,
                               self.state.best_model_checkpoint, use_mtime=True)

    def _complete_checkpoint(self, staging: Path, checkpoint: Path) -> None:
        """Fix the best-checkpoint path the stock save recorded, add the sampler state, and the manifest last."""
        if self.state.best_model_checkpoint == str(staging):
            self.state.best_model_checkpoint = str(checkpoint)
            self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
        # The sampler's position is the batches trained on; its own count runs ahead when the loader prefetches.
        sampler_state = {**self._train_sampler.state_dict(),
                         "step": self.state.global_step * self.args.gradient_accumulation_steps}
        (staging / SAMPLER_STATE_FILE).write_text(json.dumps(sampler_state))
        write_manifest(staging, self.state.global_step)

    def save_model_atomically(self, output_dir: str | Path) -> None:
        """``save_model`` into a staging folder renamed to ``output_dir`` once complete.

        Call it on every process: FSDP and DeepSpeed gather the weights for the main process to write.
        """
        with self._staged(Path(output_dir)) as staging:
            self.save_model(str(staging))

    @contextmanager
    def _staged(self, target: Path) -> Iterator[Path]:
        """A staging folder that every process may write into; once all are done, the main process renames it to
        ``target`` (replacing an older one). After an error nothing is renamed."""
        staging = staging_folder(target)
        if self.args.should_save:
            shutil.rmtree(staging.parent, ignore_errors=True)  # what a run killed while saving left behind
        self.accelerator.wait_for_everyone()
        yield staging
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_directory(staging, target)
            staging.parent.rmdir()
        self.accelerator.wait_for_everyone()

    def _heads_model(self, model=None) -> MultiTaskClassifier | None:
        """The heads model inside ``model`` (default: the trained one, which FSDP wraps), or None."""
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        return unwrapped if isinstance(unwrapped, MultiTaskClassifier) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A heads model saves its adapter and heads, not the frozen encoder; others save as the stock Trainer."""
        heads_model = self._heads_model()
        if heads_model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        heads_model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        heads_model = self._heads_model(model)
        if heads_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        heads_model.load_trained(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        heads_model = self._heads_model()
        if heads_model is None:
            return super()._load_best_model()
        heads_model.load_trained(self.state.best_model_checkpoint)
