"""EPT registered with stock PEFT by its string type: build, save (safetensors), reload, disable, print."""

import json
import pickle

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import mapping as peft_mapping

from conftest import TINY_BUILDERS, TINY_TARGETS, tiny_batch
from pyramid_peft import EptConfig, make_peft_config, method_names
from pyramid_peft.registry import METHODS


def test_every_method_is_entered_in_peft_tables():
    for name, spec in METHODS.items():
        peft_type = spec.config_cls.method_type
        assert name == spec.name and peft_type == name.upper() and spec.tuner_cls.prefix == f"{name}_"
        assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is spec.config_cls
        assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is spec.tuner_cls
        assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == spec.tuner_cls.prefix
        assert pickle.loads(pickle.dumps(spec.tuner_cls)) is spec.tuner_cls  # importable by its name


def test_make_peft_config_names_the_methods():
    assert make_peft_config("ept", target_modules=["q"]).peft_type == "EPT"
    assert make_peft_config("lora", target_modules=["q"]).peft_type.value == "LORA"
    with pytest.raises(ValueError, match="Did you mean 'ept'"):
        make_peft_config("epy")
    assert method_names()[0] == "lora"


def test_one_lookup_covers_the_registered_methods_lora_and_full():
    from peft import LoraConfig

    from pyramid_peft.registry import lookup_method, method_choices

    assert method_choices() == [*method_names(), "full"]
    assert lookup_method("LoRA").config_cls is LoraConfig and not lookup_method("lora").full
    assert lookup_method("full").full and lookup_method("full").config_cls is None
    assert all(lookup_method(name).config_cls is spec.config_cls for name, spec in METHODS.items())
    assert lookup_method("ept").takes_num_tasks and not lookup_method("lora").takes_num_tasks
    with pytest.raises(ValueError, match="Did you mean 'full'"):
        lookup_method("ful")
    with pytest.raises(ValueError, match="has no adapter config"):
        make_peft_config("full")


def trained_ept(family):
    config = EptConfig(
        target_modules=TINY_TARGETS[family], num_tasks=4, r=4, kernel_sizes=[2, 4, 4, 8], lora_dropout=0.0
    )
    model = get_peft_model(TINY_BUILDERS[family](), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def test_save_and_reload_reproduce_outputs_exactly(tmp_path, family):
    model = trained_ept(family)
    batch = tiny_batch(family)
    ids = torch.tensor([3, 0, 1, 2])
    before = model(**batch, task_ids=ids)[0]
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "EPT" and saved["kernel_sizes"] == [2, 4, 4, 8]
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(TINY_BUILDERS[family](), tmp_path).eval()
    assert isinstance(reloaded.peft_config["default"], EptConfig)
    after = reloaded(**batch, task_ids=ids)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_disable_adapter_gives_the_base_model(family):
    model = trained_ept(family)
    batch = tiny_batch(family)
    base = TINY_BUILDERS[family]()(**batch)[0]
    with model.disable_adapter():
        torch.testing.assert_close(model(**batch)[0], base, rtol=1e-6, atol=1e-6)


def test_print_trainable_parameters_counts_only_adapters(capsys):
    model = trained_ept("t5")
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    assert all("ept_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_target_modules_that_match_nothing_are_named():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(TINY_BUILDERS["t5"](), EptConfig(target_modules=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="needs target_modules"):
        get_peft_model(TINY_BUILDERS["t5"](), EptConfig())
