"""Saving and loading a heads model: its adapter and heads, not the frozen encoder."""

from __future__ import annotations

from ..heads import MultiTaskClassifier


class HeadsModelSaving:
    """Trainer mixin: a :class:`MultiTaskClassifier` saves and loads through its own ``save_pretrained`` /
    ``load_trained``; other models as in the stock Trainer."""

    def _heads_model(self, model=None) -> MultiTaskClassifier | None:
        """The heads model inside ``model`` (default: the trained one, which FSDP wraps), or None."""
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        return unwrapped if isinstance(unwrapped, MultiTaskClassifier) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A heads model saves its adapter and heads, not the frozen encoder; others save as the stock Trainer."""
        heads_model = self._heads_model()
        if heads_model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        heads_model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if self.args.should_save and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        heads_model = self._heads_model(model)
        if heads_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        heads_model.load_trained(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        heads_model = self._heads_model()
        if heads_model is None:
            return super()._load_best_model()
        heads_model.load_trained(self.state.best_model_checkpoint)
