"""Stopping on purpose: SIGTERM / Ctrl-C (checkpoint, then stop) and a non-finite loss (stop before the update);
resuming only from a complete checkpoint, said out loud."""

from __future__ import annotations

import sys

import torch

from ..checkpoints import check_resume_config, newest_sound_checkpoint, newest_valid_checkpoint, resolve_resume
from ..guards import NonFiniteLossError, StopSignals, TrainingInterrupted


class CleanStops:
    """Trainer mixin: ``train`` resumes from the newest complete checkpoint (and says which) when it was trained
    under the same settings, stops cleanly on SIGTERM or Ctrl-C, and every process agrees on stopping at the same
    step.

    Reads ``self.config_record`` (the run's config as a dict, or None: nothing to compare) and
    ``self.allow_config_change``; sets ``self._resume_checkpoint`` (the checkpoint resumed from, or None).
    """

    config_record: dict | None = None
    allow_config_change: bool = False

    def _setup_stops(self) -> None:
        self._resume_checkpoint: str | None = None
        self._signals = StopSignals()
        self._agreed_signal: int | None = None

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Stock training that resumes only from a complete checkpoint and stops cleanly on SIGTERM or Ctrl-C.

        Raises :class:`TrainingInterrupted` after such a stop (its checkpoint saved), :class:`NonFiniteLossError`
        on a NaN or infinite loss, :class:`CheckpointError` when there is no valid checkpoint to resume from, and
        :class:`ConfigChangedError` when the checkpoint was trained under settings the run changes.
        """
        self._resume_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if self._resume_checkpoint is not None and self.config_record is not None:
            check_resume_config(self._resume_checkpoint, self.config_record, self.allow_config_change)
        if self._resume_checkpoint is not None and self.is_world_process_zero():
            print(f"ept: resuming from {self._resume_checkpoint}", file=sys.stderr)
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
        mine = torch.stack(
            [loss.detach().float().reshape(()), torch.tensor(float(self._signals.received or 0), device=loss.device)]
        )
        everyone = self.accelerator.gather(mine[None])  # (processes, 2): loss, signal number
        losses, signals = everyone[:, 0], everyone[:, 1]
        if not torch.isfinite(losses).all():
            bad = losses[~torch.isfinite(losses)][0].item()
            raise NonFiniteLossError(self.state.global_step + 1, bad, newest_sound_checkpoint(self.args.output_dir))
        if signals.any():
            self._agreed_signal = int(signals.max())
            self.control.should_save = True
            self.control.should_training_stop = True
