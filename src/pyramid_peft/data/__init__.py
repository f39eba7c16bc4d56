"""Data: loading GLUE and commonsense QA, the protocols' splits, multi-task sampling and batch collation."""

from .collators import CausalLMCollator, ClassificationCollator, TextToTextCollator
from .location import DataSourceError, resolve_data_dir
from .sampling import MultiTaskBatchSampler, task_probabilities
from .sources import load_examples
from .splits import TaskSplits, build_splits

__all__ = [
    "CausalLMCollator",
    "ClassificationCollator",
    "DataSourceError",
    "MultiTaskBatchSampler",
    "TaskSplits",
    "TextToTextCollator",
    "build_splits",
    "load_examples",
    "resolve_data_dir",
    "task_probabilities",
]
