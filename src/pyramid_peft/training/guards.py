"""Stopping a run on purpose: SIGTERM / Ctrl-C (checkpoint, then stop) and a non-finite loss (stop, save nothing)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before that step changed any weights."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None):
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        if checkpoint is None:
            where = "There is no checkpoint with finite weights and losses: train again"
        else:
            where = (
                f"The last good checkpoint (finite weights and losses) is {checkpoint}: resume with "
                f"--resume_from_checkpoint {checkpoint}"
            )
        super().__init__(
            f"the training loss is {loss} at step {step}; training stopped before that step's optimizer update, "
            f"and nothing was saved from it. {where} after lowering learning_rate (or setting max_grad_norm), or "
            "check the data of that step."
        )


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training after saving a checkpoint; ``signum`` says which."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if checkpoint is None:
            saved = "no checkpoint was saved"
        else:
            saved = (
                f"the checkpoint is {checkpoint}. Resume with the same command plus --resume_from_checkpoint "
                f"(the newest valid checkpoint of {checkpoint.parent}) or --resume_from_checkpoint {checkpoint}"
            )
        super().__init__(f"{name} stopped training at step {step}; {saved}.")


class StopSignals:
    """While entered (in the main thread), SIGTERM and SIGINT only set :attr:`received`; a second one acts as usual.

    The trainer polls :attr:`received` once per step, so a run stops at a step boundary with a checkpoint instead of
    in the middle of an optimizer update or a save. A signal the process ignores when entered stays ignored, as
    Python itself leaves it: a job started in the background (``&``, ``nohup``) ignores SIGINT by design.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {
                signum: signal.signal(signum, self._handle)
                for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN
            }
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # asked twice: stop now, the way the signal normally would
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.__exit__()
            if callable(previous):  # Python's own Ctrl-C handler raises KeyboardInterrupt here, at once
                previous(signum, frame)
            else:  # the default action (SIGTERM's: terminate); re-raised, it would run a check point late
                signal.raise_signal(signum)
            return
        self.received = signum
        sys.stderr.write(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then "
            "stopping (send it again to stop at once).\n"
        )
