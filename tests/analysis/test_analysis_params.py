"""Appendix C tables on t5-base and Llama-2-7b shapes built from the repository's model configs (arXiv 2603.12577)."""

import pytest
import yaml

from pyramid_peft.analysis.params import (
    DEFAULT_TARGETS,
    _methods,
    appendix_c_table,
    find_model_config,
    method_table,
    params_command,
    resolve_setting,
)
from pyramid_peft.cli import main
from pyramid_peft.registry import METHODS

GLUE = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]


def experiment_config(tmp_path, model: str, **method) -> str:
    raw = {
        "model": {"name": model},
        "method": {"name": "ept", "target_modules": DEFAULT_TARGETS["t5"], **method},
        "tasks": GLUE,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_model_names_find_the_kept_configs():
    assert find_model_config("t5-base").name == "t5-base.json"
    assert find_model_config("google-t5/t5-base").name == "t5-base.json"
    assert find_model_config("meta-llama/Llama-2-7b-hf").name == "llama-2-7b.json"
    assert find_model_config("bert-base-uncased") is None


@pytest.mark.parametrize("form,total,adapter", [("code1d", 6_489_600, 3_244_032), ("kron2d", 4_913_664, 1_668_096)])
def test_ept_on_t5_base_matches_the_spec(tmp_path, form, total, adapter):
    setting = resolve_setting(experiment_config(tmp_path, "t5-base", expert_form=form, r=8))
    groups, counts = method_table(setting, "ept")
    assert (counts["modules"], counts["total"], counts["adapter"]) == (192, total, adapter)
    assert counts["per_task_without_router"] == adapter / 8
    assert {g["shape"]: g["modules"] for g in groups} == {"768→768": 144, "768→3072": 24, "3072→768": 24}
    for group in ("adapter", "router", "task_embedding"):  # the per-module groups add up to the totals
        assert sum(g[group] * g["modules"] for g in groups) == counts[group]
    if form == "kron2d":
        square = next(g for g in groups if g["shape"] == "768→768")
        assert square["adapter"] == 2 * 384 * 8 + 2 * (4 + 16 + 36 + 64)  # Appendix C: 6,384 per layer


def test_lora_on_t5_base_and_llama_2_7b():
    _, t5 = method_table(resolve_setting("t5-base"), "lora")
    assert t5["total"] == 3_244_032 and t5["per_task"] == 405_504
    _, llama = method_table(resolve_setting("meta-llama/Llama-2-7b-hf"), "lora")
    assert llama["modules"] == 192  # §2.4: LoRA 2.02M/task at 8 tasks
    assert llama["total"] == 32 * (4 * 8 * 8192 + 2 * 8 * (4096 + 11008))


def test_the_markdown_table_has_both_accountings(tmp_path):
    table = appendix_c_table(experiment_config(tmp_path, "t5-base", expert_form="code1d"), methods=["ept", "more"])
    assert "| ept | 192 | 3,244,032 | 1,623,552 | 1,622,016 | 6,489,600 | 405,504 (0.41M) | 811,200 (0.81M) |" in table
    assert "| more | 192 | 3,244,032 |" in table
    assert "| ept | 768→3072 | 24 |" in table
    assert "8 tasks, targets q, k, v, o, wi, wo" in table


def test_the_wording_cites_no_figure_the_table_does_not_hold(tmp_path):
    """The sentence above the table once quoted the paper's 0.41M per task above a kron2d row of 0.21M."""
    import re

    table = appendix_c_table(experiment_config(tmp_path, "t5-base", expert_form="kron2d"), methods=["ept"])
    prose, rows = table.split("### Per adapted module")
    assert re.findall(r"\d+\.\d+[MK]", prose.split("\n", 2)[2]) == []  # no counts in the explanation
    assert '"per task, no router" counts as the EPT paper does' in prose and "as MoRE does" in prose
    assert "208,512 (0.21M)" in rows


def test_a_model_name_gives_every_method_and_rejects_overrides():
    table = appendix_c_table("t5-base", methods=["lora", "mixlora", "tucka"])
    assert "| mixlora | T5DenseActDense 768→768 | 24 |" in table  # MixLoRA's experts wrap whole FFN blocks
    with pytest.raises(ValueError, match="need an experiment config"):
        resolve_setting("t5-base", overrides=["--method.r", "4"])
    with pytest.raises(ValueError, match="Unknown method"):
        appendix_c_table("t5-base", methods=["eptt"])


def test_the_table_of_a_config_and_its_overrides(tmp_path):
    path = experiment_config(tmp_path, "t5-base", expert_form="code1d")
    table = appendix_c_table(path, overrides=["--method.r", "4"])  # the config's own method only
    assert table.count("| ept | 192 |") == 1 and "| more |" not in table
    assert "| ept | 192 | 2,433,024 |" in table  # r = 4 halves the A/B part (1,622,016); the kernels stay
    setting = resolve_setting(path)
    assert _methods("all", setting) == ["ept", "lora", *sorted(set(METHODS) - {"ept"})]
    assert _methods(None, resolve_setting("t5-base")) == ["lora", *METHODS]


def test_the_params_command_takes_methods_out_of_the_overrides(tmp_path):
    path = experiment_config(tmp_path, "t5-base", expert_form="code1d")
    table = params_command(path, ["--method.r", "4", "--methods", "lora", "ept"])
    assert "| lora | 192 | 3,244,032 |" in table and "| ept | 192 | 2,433,024 |" in table
    with pytest.raises(ValueError, match="--methods needs"):
        params_command("t5-base", ["--methods"])


@pytest.mark.parametrize(
    ("tokens", "message"),
    [(["--methods", "loraa"], "Did you mean 'lora'?"), (["--methods"], "--methods needs method names")],
)
def test_a_wrong_methods_list_is_a_two_line_error_with_exit_2(capsys, tokens, message):
    with pytest.raises(SystemExit) as stop:
        main(["params", "t5-base", *tokens])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
