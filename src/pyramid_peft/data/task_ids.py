"""Task ids through the stock trainers: transformers' ``Trainer`` and TRL's ``SFTTrainer``.

A routed model needs ``task_ids`` in every call. A dataset carries them as a ``task_ids`` column (one int per
example); two things in the stock trainers drop it on the way:

* ``remove_unused_columns=True`` (their default) keeps only the columns the base model's ``forward`` names (TRL's
  SFTTrainer: ``input_ids``, ``labels``, ``seq_lengths``). The one setting to change is
  ``remove_unused_columns=False`` in ``TrainingArguments`` / ``SFTConfig``.
* Collators that build their batch from known keys only, as TRL's ``DataCollatorForLanguageModeling`` does.
  :class:`TaskIdsCollator` wraps any collator and puts the ids back. transformers' own collators
  (``default_data_collator``, ``DataCollatorWithPadding``, ``DataCollatorForSeq2Seq``) pass the column through.

When ids are missing anyway, :func:`stock_trainer_hint` adds to the routing error which of the two happened.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch

from ..routing import MISSING_IDS_HINTS, TaskRoutingError

TASK_IDS = "task_ids"


class TaskIdsCollator:
    """Collate with ``collator`` (default: transformers' ``default_data_collator``) and add ``task_ids``.

    Each feature's ``task_ids`` entry (an int) is taken out before ``collator`` sees the feature, so collators that
    reject or drop unknown keys work, and returned as a LongTensor with one id per row of the batch. Typical use::

        trainer = SFTTrainer(model=peft_model, args=SFTConfig(..., remove_unused_columns=False), ...)
        trainer.data_collator = TaskIdsCollator(trainer.data_collator)

    Packing and padding-free batches put several examples in one row, which no single task id describes: they are
    refused with the setting to turn off.
    """

    def __init__(self, collator: Callable | None = None, key: str = TASK_IDS):
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        self.collator = collator
        self.key = key

    def __call__(self, features: list[dict]) -> dict:
        ids = [self._task_id(row, feature) for row, feature in enumerate(features)]
        batch = self.collator([{k: v for k, v in feature.items() if k != self.key} for feature in features])
        rows = batch["input_ids"].shape[0] if "input_ids" in batch else len(ids)
        if rows != len(ids):
            raise TaskRoutingError(
                f"the collator packed {len(ids)} examples into {rows} rows, and a routed model needs one task per "
                "row: turn packing and padding_free off (SFTConfig(packing=False, padding_free=False))."
            )
        batch[self.key] = torch.tensor(ids, dtype=torch.long)
        return batch

    def _task_id(self, row: int, feature: dict) -> int:
        if self.key not in feature:
            raise TaskRoutingError(
                f"example {row} of the batch has no {self.key!r} field (it has: {', '.join(sorted(feature))}). "
                f"Give the dataset a {self.key!r} column of task indices; a Trainer with remove_unused_columns=True "
                "(the default) removes it before collation: set remove_unused_columns=False in its arguments."
            )
        value = feature[self.key]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int):
            raise TaskRoutingError(
                f"example {row}: {self.key}={value!r} is not a task index: the column must hold one int per example."
            )
        return value


def stock_trainer_hint() -> str | None:
    """Why a stock Trainer on the call stack delivered no task ids, and the fix; None when no stock Trainer runs."""
    from transformers import Trainer

    trainer = _enclosing(Trainer)
    if trainer is None or type(trainer).__module__.startswith("pyramid_peft"):
        return None  # pyramid_peft's own trainer carries the ids itself
    name, collator = type(trainer).__name__, trainer.data_collator
    wrap = (
        f"wrap its collator, trainer.data_collator = pyramid_peft.TaskIdsCollator(trainer.data_collator), which "
        f"carries the column through {type(collator).__name__}"
    )
    keeps_keys = not type(collator).__module__.startswith("trl")  # TRL's collators build batches from known keys
    if trainer.args.remove_unused_columns:
        return (
            f"{name} runs with remove_unused_columns=True, which drops a {TASK_IDS!r} dataset column (the base "
            f"model's forward does not name it): set remove_unused_columns=False in its arguments"
            + ("." if keeps_keys or isinstance(collator, TaskIdsCollator) else f", and {wrap}.")
        )
    if not isinstance(collator, TaskIdsCollator):
        return f"{name}'s data collator returned batches without {TASK_IDS!r}: give the dataset that column and {wrap}."
    return None


def _enclosing(cls: type):
    """The nearest caller whose ``self`` is an instance of ``cls``, or None."""
    callers = (frame.f_locals.get("self") for frame, _ in traceback.walk_stack(None))
    return next((caller for caller in callers if isinstance(caller, cls)), None)


MISSING_IDS_HINTS.append(stock_trainer_hint)
