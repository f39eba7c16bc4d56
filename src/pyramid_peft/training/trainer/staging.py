"""Checkpoint staging: every checkpoint and the final weights appear complete (with a manifest) or not at all."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ...atomic import publish_directory
from ..checkpoints import SAMPLER_STATE_FILE, staging_folder, write_manifest


class StagedCheckpoints:
    """Trainer mixin: the stock checkpoint (pointed at a staging folder, on every process), plus the sampler state
    and ``self.extra_files`` (name -> text, e.g. the config the weights were trained with), completed by a
    manifest and renamed into place; ``save_model_atomically`` does the same for the final weights.

    Reads ``self.sampler_state()`` (:class:`.data.TaskBatches`) and ``self.extra_files``.
    """

    extra_files: dict[str, str]
    _staging_root: Path | None = None

    def _get_output_dir(self, trial) -> str:
        """The run folder; while :meth:`_save_checkpoint` runs the stock save, the staging folder instead."""
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint plus the sampler state, made atomic: written into a staging folder (the stock save,
        pointed there, on every process), completed by a manifest, then renamed to ``checkpoint-<step>``."""
        checkpoint = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with self._staged(checkpoint) as staging:
            self._staging_root = staging.parent
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            self.accelerator.wait_for_everyone()  # every process's RNG state is in before the manifest
            if self.args.should_save:
                self._complete_checkpoint(staging, checkpoint)
        if self.args.should_save:
            rotate_checkpoints(
                str(checkpoint.parent), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )

    def _complete_checkpoint(self, staging: Path, checkpoint: Path) -> None:
        """Fix the best-checkpoint path the stock save recorded, add the sampler state and the extra files, and the
        manifest last."""
        if self.state.best_model_checkpoint == str(staging):
            self.state.best_model_checkpoint = str(checkpoint)
            self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
        (staging / SAMPLER_STATE_FILE).write_text(json.dumps(self.sampler_state()))
        self._finish_folder(staging)

    def _finish_folder(self, staging: Path) -> None:
        for name, text in self.extra_files.items():
            (staging / name).write_text(text, encoding="utf-8")
        write_manifest(staging, self.state.global_step)

    def save_model_atomically(self, output_dir: str | Path) -> None:
        """``save_model`` into a staging folder, plus the extra files and a manifest, renamed to ``output_dir`` once
        complete. Call it on every process: FSDP and DeepSpeed gather the weights for the main process to write."""
        with self._staged(Path(output_dir)) as staging:
            self.save_model(str(staging))  # the main process writes the weights: it then adds the rest
            if self.args.should_save:
                self._finish_folder(staging)

    @contextmanager
    def _staged(self, target: Path) -> Iterator[Path]:
        """A staging folder that every process may write into; once all are done, the main process renames it to
        ``target`` (replacing an older one). After an error nothing is renamed."""
        staging = staging_folder(target)
        if self.args.should_save:
            shutil.rmtree(staging.parent, ignore_errors=True)  # what a run killed while saving left behind
        self.accelerator.wait_for_everyone()
        yield staging
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_directory(staging, target)
            staging.parent.rmdir()
        self.accelerator.wait_for_everyone()
