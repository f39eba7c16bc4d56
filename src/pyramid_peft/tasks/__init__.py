"""Task registry: label words, prompts, metrics and data locations of the GLUE and commonsense QA tasks."""

from .registry import TASK_NAMES, UnknownTaskError, get_task, register_task, unregister_task
from .spec import HubSource, LocalFiles, TaskSpec

__all__ = [
    "TASK_NAMES",
    "HubSource",
    "LocalFiles",
    "TaskSpec",
    "UnknownTaskError",
    "get_task",
    "register_task",
    "unregister_task",
]
