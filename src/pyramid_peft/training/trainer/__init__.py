"""The multi-task Trainer (:class:`MultiTaskTrainer`), split into one mixin per job."""

from .data import FEATURE_KEYS, MultiTaskDataset
from .evaluation import EvalSetup
from .multitask import MultiTaskTrainer

__all__ = ["FEATURE_KEYS", "EvalSetup", "MultiTaskDataset", "MultiTaskTrainer"]
