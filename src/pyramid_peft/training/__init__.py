"""Multi-task training on the Hugging Face Trainer: configs, heads, the trainer, and run folders."""

from .config import ConfigError, ExperimentConfig, load_config
from .experiment import RunError, build_experiment
from .export import export_run
from .heads import MultiTaskClassifier
from .loading import load_run
from .run import evaluate_run, train
from .trainer import MultiTaskTrainer

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "MultiTaskClassifier",
    "MultiTaskTrainer",
    "RunError",
    "build_experiment",
    "evaluate_run",
    "export_run",
    "load_config",
    "load_run",
    "train",
]
