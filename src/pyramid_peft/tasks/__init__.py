"""Task registry: label words, prompts and metrics of the GLUE and commonsense QA tasks."""

from .registry import TASK_NAMES, UnknownTaskError, get_task
from .spec import TaskSpec

__all__ = ["TASK_NAMES", "TaskSpec", "UnknownTaskError", "get_task"]
