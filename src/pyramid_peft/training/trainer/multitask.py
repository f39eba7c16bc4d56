"""The multi-task Trainer: stock ``Seq2SeqTrainer`` plus what multi-task routed adapters need, one job per mixin.

* :class:`.data.TaskBatches`: batches from :class:`pyramid_peft.data.MultiTaskBatchSampler` (one task per batch,
  or mixed) that carry ``task_ids``, which the stock Trainer would drop because the base model's ``forward`` does
  not name it;
* :class:`.loss.AuxiliaryLoss`: the loss adds the method's auxiliary loss (:func:`pyramid_peft.aux_loss`), whose
  terms are logged;
* :class:`.stopping.CleanStops`: SIGTERM / Ctrl-C save a checkpoint and stop, a non-finite loss stops the run
  before it changes any weights, resuming uses the newest complete checkpoint; every process takes these
  decisions at the same step;
* :class:`.optimizer.HeadLearningRate`: classification heads can have their own learning rate;
* :class:`.evaluation.PerTaskEvaluation`: evaluation is per task and logs ``eval_<task>_<metric>``,
  ``eval_paper_average`` and ``eval_full_average``;
* :class:`.staging.StagedCheckpoints`: checkpoints and the final weights are written atomically with a manifest;
* :class:`.saving.HeadsModelSaving`: a heads model saves adapter + heads, not the whole frozen encoder.

Everything else (checkpoint contents, TensorBoard, progress bars, DDP / FSDP / DeepSpeed through accelerate) is
the stock Trainer's.
"""

from __future__ import annotations

from transformers import Seq2SeqTrainer

from ..config import SamplingSection
from .data import TaskBatches
from .evaluation import EvalSetup, PerTaskEvaluation
from .loss import AuxiliaryLoss
from .optimizer import HeadLearningRate
from .saving import HeadsModelSaving
from .staging import StagedCheckpoints
from .stopping import CleanStops


class MultiTaskTrainer(
    TaskBatches,
    AuxiliaryLoss,
    CleanStops,
    HeadLearningRate,
    PerTaskEvaluation,
    StagedCheckpoints,
    HeadsModelSaving,
    Seq2SeqTrainer,
):
    """A ``Seq2SeqTrainer`` for several tasks at once.

    Args:
        train_dataset: a :class:`.data.MultiTaskDataset`.
        eval_setup: per-task evaluation sets and how to build their inputs.
        sampling: the task-sampling section of the config.
        head_learning_rate: learning rate of a heads model's heads (default: ``args.learning_rate``).
        extra_files: files (name -> text) written into every checkpoint and the final weights folder, such as the
            config those weights were trained with.
        config_record: that config as a dict: resuming compares the checkpoint's record with it
            (:func:`..checkpoints.check_resume_config`).
        allow_config_change: resume a checkpoint trained under other settings anyway (a run extended on purpose).
        Other arguments are the stock Trainer's.
    """

    def __init__(
        self,
        *args,
        eval_setup: EvalSetup,
        sampling: SamplingSection,
        head_learning_rate: float | None = None,
        extra_files: dict[str, str] | None = None,
        config_record: dict | None = None,
        allow_config_change: bool = False,
        **kwargs,
    ):
        # The stock argument checks want an eval_dataset when evaluating during training; ours are per task.
        kwargs.setdefault("eval_dataset", {s.task.name: s.examples for s in eval_setup.sets})
        super().__init__(*args, **kwargs)
        self.eval_setup = eval_setup
        self.sampling = sampling
        self.head_learning_rate = head_learning_rate
        self.extra_files = dict(extra_files or {})
        self.config_record = config_record
        self.allow_config_change = allow_config_change
        # The aux loss is a per-batch mean, so the task loss must be one too: the model must not normalise by the
        # token count of the whole accumulated batch, or the two terms would be scaled differently.
        self.model_accepts_loss_kwargs = False
        self.last_eval_results: dict | None = None
        self._train_sampler = None
        self._reset_aux()
        self._setup_stops()
