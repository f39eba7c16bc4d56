"""Multi-task training on the Hugging Face Trainer: configs, heads, the trainer, and run folders."""

from .config import ConfigError, ExperimentConfig, load_config
from .heads import MultiTaskClassifier
from .run import build_experiment, evaluate_run, export_run, load_run, train
from .trainer import MultiTaskTrainer

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "MultiTaskClassifier",
    "MultiTaskTrainer",
    "build_experiment",
    "evaluate_run",
    "export_run",
    "load_config",
    "load_run",
    "train",
]
