"""``ept train`` refuses FSDP on the CPU: accelerate's FSDP plugin is ignored there and the model would train unsharded
(docs/sharded-training.md)."""

import pytest

from pyramid_peft.training import ConfigError, train
from pyramid_peft.training.config import from_dict


def test_fsdp_asked_for_on_the_cpu_is_refused_before_the_run_folder_is_touched(tiny_experiment, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for distributed_type: FSDP
    with pytest.raises(ConfigError, match="ignores the plugin") as refused:
        train(from_dict(tiny_experiment("causal"), for_training=True))
    assert "cpu-2proc.yaml" in str(refused.value) and "fully_shard" in str(refused.value)
    assert not (tmp_path / "run").exists()
