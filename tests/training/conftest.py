"""Fixtures of the training tests."""

import pytest
import torch

from pyramid_peft.training.config import from_dict
from pyramid_peft.training.evaluate import Predictor
from pyramid_peft.training.experiment import build_experiment, collators


@pytest.fixture
def scoring_experiment(tiny_experiment):
    """``make(family, tasks, answer_scoring)`` -> (experiment, predictor): a tiny model whose adapter is random (so
    routing by task changes the answer), in eval mode, with whole prompts (no truncation) and a Predictor that
    scores answers that way."""

    def make(family, tasks, answer_scoring):
        raw = tiny_experiment(family, tasks=tasks)
        raw["data"].update(answer_scoring=answer_scoring, max_source_length=1024)
        experiment = build_experiment(from_dict(raw))
        model = experiment.model.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.5)
        _, collator = collators(experiment)
        predictor = Predictor(
            model, family, collator, experiment.tokenizer, batch_size=4, answer_scoring=answer_scoring
        )
        return experiment, predictor

    return make
