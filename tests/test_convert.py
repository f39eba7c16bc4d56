"""Importing checkpoints of the public EPT and TuckA code (``convert_reference`` / ``ept convert``)."""

import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "methods"))

import _reference as ref  # noqa: E402

from conftest import shared_dir  # noqa: E402
from pyramid_peft import ConversionError, EptConfig, TuckaConfig, convert_reference  # noqa: E402
from pyramid_peft.cli import main  # noqa: E402

GOLDEN = shared_dir() / "spec" / "golden" / "ept_code1d_96x192.safetensors"
KERNELS = [2, 2, 4, 4, 6, 6, 8, 8]


class One(nn.Module):
    def __init__(self, d_in=96, d_out=192):
        super().__init__()
        self.q = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.q(x)


def golden() -> dict:
    if not GOLDEN.exists():
        pytest.skip(f"golden tensors not found at {GOLDEN}")
    return load_file(str(GOLDEN))


def write_reference_ept(folder: Path, tensors: dict, bin_file: bool = False) -> Path:
    """The folder the public EPT code's save_pretrained writes: its LoraConfig and the adapter-less key names."""
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=4, lora_alpha=8, target_modules=["q"], lora_dropout=0.0).save_pretrained(folder)
    state = {
        f"base_model.model.q.{name.replace('.default', '')}": value
        for name, value in tensors.items()
        if name.startswith("lora_")
    }
    if bin_file:
        torch.save(state, folder / "adapter_model.bin")
    else:
        save_file(state, str(folder / "adapter_model.safetensors"))
    return folder


def golden_base(tensors: dict) -> One:
    base = One()
    base.q.load_state_dict({"weight": tensors["base_layer.weight"], "bias": tensors["base_layer.bias"]})
    return base


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("bin_file", [False, True], ids=["safetensors", "bin"])
def test_converted_golden_checkpoint_reproduces_outputs_and_contrastive_losses(tmp_path, bin_file):
    tensors = golden()
    src = write_reference_ept(tmp_path / "reference", tensors, bin_file)
    out = convert_reference(src, tmp_path / "converted", source="ept-code", base_model=golden_base(tensors))
    model = PeftModel.from_pretrained(golden_base(tensors), out).eval()
    config = model.peft_config["default"]
    assert (config.kernel_sizes, config.top_k, config.gate_form, config.expert_form) == (KERNELS, 2, "code", "code1d")
    layer = model.base_model.model.q
    x = tensors["x"]
    for task in range(8):
        y = model(x, task_ids=torch.full((x.shape[0],), task))
        torch.testing.assert_close(y, tensors[f"y_task{task}"], rtol=0, atol=1e-12)
        loss = layer.aux_terms("default")["contrastive"]
        torch.testing.assert_close(loss, tensors[f"cl_loss_task{task}"].reshape(()), rtol=0, atol=1e-12)


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    tensors = golden()
    src = write_reference_ept(tmp_path / "reference", tensors)
    assert main(["convert", str(src), str(tmp_path / "out"), "--from", "ept-code", "--top_k", "3"]) == 0
    assert "converted" in capsys.readouterr().out
    assert EptConfig.from_pretrained(tmp_path / "out").top_k == 3
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--from", "ept-code"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_errors_name_the_key_and_the_module(tmp_path):
    tensors = golden()
    src = write_reference_ept(tmp_path / "reference", tensors)
    with pytest.raises(ConversionError, match=r"'base_model.model.q.lora_A.weight'.*module 'q'.*\(50 -> 192\)"):
        convert_reference(src, tmp_path / "a", base_model=One(d_in=50))
    with pytest.raises(ConversionError, match="names module 'q', which the base model does not have"):
        convert_reference(src, tmp_path / "b", base_model=nn.Sequential(nn.Linear(96, 192)))
    with pytest.raises(ConversionError, match="not a tensor of the public TuckA layer.*another source"):
        convert_reference(src, tmp_path / "c", source="tucka-code")
    with pytest.raises(ConversionError, match=r"\['gate'\] do not apply to tucka-code"):
        convert_reference(src, tmp_path / "c", source="tucka-code", gate="code")
    bad = dict(tensors)
    bad["lora_gate.default.0.bias"] = torch.zeros(7)
    with pytest.raises(ConversionError, match=r"'base_model.model.q.lora_gate.0.bias' of module 'q' has shape \(7,\)"):
        convert_reference(write_reference_ept(tmp_path / "bad", bad), tmp_path / "d")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text("{}")
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(4, 96)}, str(plain / "adapter_model.safetensors"))
    with pytest.raises(ConversionError, match="module 'q'.*lacks.*not a checkpoint of the public EPT code"):
        convert_reference(plain, tmp_path / "e")
    save_file({"base_model.model.q.weight": torch.zeros(1)}, str(plain / "adapter_model.safetensors"))
    with pytest.raises(ConversionError, match="key 'base_model.model.q.weight'.*is not a tensor of the public"):
        convert_reference(plain, tmp_path / "f")
    (plain / "adapter_model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        convert_reference(plain, tmp_path / "g")
    assert not any((tmp_path / name).exists() for name in "abcdefg")


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(12, 12)
        self.second = nn.Linear(12, 7)

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.usefixtures("float64_default")
def test_converted_tucka_checkpoint_keeps_its_trained_centroids(tmp_path):
    k, p, r, t = 2, 2, 3, 2
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in ("first", "second"):
        state[f"base_model.model.{name}.tucka_g"] = torch.randn(k, p, r, r, generator=g)
        state[f"base_model.model.{name}.tucka_c"] = torch.randn(t, p, generator=g)
        state[f"base_model.model.{name}.tucka_u"] = torch.randn(12, r, generator=g)
    state["base_model.model.first.tucka_ec"] = torch.randn(k * t, 12, generator=g)
    src = tmp_path / "reference"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"peft_type": "TUCKA", "r": 3, "k": 2, "t": 2, "p": 2, "alpha": 2.0}')
    torch.save(state, src / "adapter_model.bin")

    out = convert_reference(src, tmp_path / "converted", source="tucka-code", base_model=Two())
    model = PeftModel.from_pretrained(Two(), out).eval()
    config = model.peft_config["default"]
    assert isinstance(config, TuckaConfig) and (config.k, config.p, config.r, config.t, config.alpha) == (k, p, r, t, 2)
    x = torch.randn(3, 4, 12, generator=g)
    y = model(x)
    first, second = model.base_model.model.first, model.base_model.model.second
    assert torch.equal(first.tucka_centroids["default"], state["base_model.model.first.tucka_ec"])  # not re-set
    group, weights = ref.tucka_route(first, x.reshape(-1, 12).mean(0))
    h = ref.base_output(first, x) + x @ ref.tucka_delta(first, group, weights).T
    expected = ref.base_output(second, h) + h @ ref.tucka_delta(second, group, weights).T
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_the_sources_of_ept_convert_are_the_registered_converters():
    from pyramid_peft.cli import build_parser
    from pyramid_peft.methods.spec import CONVERTERS, Converter, register_converter

    assert sorted(CONVERTERS) == ["ept-code", "tucka-code"]
    register_converter(Converter("toy-code", "a toy layer", r"toy", convert=None, expected_shapes=None))
    try:
        assert build_parser().parse_args(["convert", "src", "out", "--from", "toy-code"]).source == "toy-code"
    finally:
        CONVERTERS.pop("toy-code")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "src", "out", "--from", "toy-code"])
