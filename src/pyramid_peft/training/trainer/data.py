"""Training batches: every task's examples behind one dataset, drawn by the multi-task sampler with ``task_ids``."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from ...data import MultiTaskBatchSampler
from ..checkpoints import SAMPLER_STATE_FILE, CheckpointError

# Feature keys our datasets and collators use; the Trainer must not strip them.
FEATURE_KEYS = ("task_id", "task", "example", "task_ids")


class MultiTaskDataset(Dataset):
    """All tasks' training examples, indexed by ``(task index, example index)`` pairs as the sampler yields."""

    def __init__(self, task_names: list[str], examples: list[list[dict]], weights: list[float] | None = None):
        self.task_names = task_names
        self.examples = examples
        self.weights = weights  # per-task sampling weights (None: all 1)

    def __len__(self) -> int:
        return sum(len(e) for e in self.examples)

    def __getitem__(self, index: tuple[int, int]) -> dict:
        task_id, example_id = index
        return {"task_id": task_id, "task": self.task_names[task_id], "example": self.examples[task_id][example_id]}


class TaskBatches:
    """Trainer mixin: batches from :class:`MultiTaskBatchSampler`, keeping the feature keys the stock Trainer would
    drop, and refusing to resume under other sampling settings than the checkpoint's.

    Reads ``self.sampling`` (the config's sampling section) and ``self._resume_checkpoint``; sets
    ``self._train_sampler``.
    """

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
            weights=getattr(dataset, "weights", None),
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

    def sampler_state(self) -> dict:
        """The sampler's position for a checkpoint: the batches trained on (its own count runs ahead when the loader
        prefetches)."""
        return {
            **self._train_sampler.state_dict(),
            "step": self.state.global_step * self.args.gradient_accumulation_steps,
        }
