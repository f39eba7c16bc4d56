"""The README and the documentation site: length, links, generated pages that follow the code and the reports."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")

pytest.importorskip("griffe", reason="the docs extra is not installed: pip install -e '.[docs]'")


@pytest.fixture(scope="module")
def pages():
    spec = importlib.util.spec_from_file_location("docs_pages", ROOT / "scripts" / "docs_pages.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_pages"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_short_opens_with_the_two_commands_and_its_relative_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    assert commands[:2] == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert "\n## Results\n" in text
    targets = [a or b for a, b in LINK.findall(text)]
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert relative, "the README links into the docs"
    assert [t for t in relative if not (ROOT / t).exists()] == []


def test_the_readme_results_lines_are_those_the_reports_give(pages):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert pages.readme_with_results(text) == text, "run: python scripts/docs_pages.py readme"
    assert pages.main(["readme", "--check"]) == 0


def test_a_readme_out_of_step_with_the_reports_is_caught(pages, tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    readme.write_text(re.sub(r"ept-kron2d \d+\.\d", "ept-kron2d 99.9", text, count=1))
    assert pages.main(["readme", "--check", "--readme", str(readme)]) == 1
    assert "python scripts/docs_pages.py readme" in capsys.readouterr().out


def test_the_api_reference_lists_every_export(pages):
    import pyramid_peft

    text = pages.api_reference()
    assert sorted(re.findall(r"^::: pyramid_peft\.(\w+)$", text, re.M)) == sorted(pyramid_peft.__all__)
    assert "## Method configs" in text and "::: pyramid_peft.EptConfig" in text


def test_the_cli_reference_lists_every_command_and_flag(pages):
    import argparse

    from pyramid_peft.cli import build_parser

    text = pages.cli_reference()

    def walk(parser, name):
        assert f"`{name}`" in text
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            if not isinstance(action, argparse._HelpAction):
                assert all(flag in text for flag in action.option_strings), f"{name}: {action.option_strings}"

    walk(build_parser(), "ept")


def test_the_config_reference_lists_every_section_and_key(pages):
    from transformers import Seq2SeqTrainingArguments

    from pyramid_peft.registry import METHODS
    from pyramid_peft.training.config import ExperimentConfig

    text = pages.config_reference()
    for section in dataclasses.fields(ExperimentConfig):
        assert f"## `{section.name}`" in text
        default = section.default_factory()
        if dataclasses.is_dataclass(default) and section.name != "method":
            for key in dataclasses.fields(default):
                assert f"| `{section.name}.{key.name}` |" in text
    for name, spec in METHODS.items():
        assert f"`method.name: {name}`" in text
        assert all(
            f"`method.{f.name}`" in text for f in dataclasses.fields(spec.config_cls) if f.name in ("r", "top_k")
        )
    assert "| `learning_rate` | `float` | `5e-05` |" in text
    assert len([f for f in dataclasses.fields(Seq2SeqTrainingArguments) if f"| `{f.name}` |" in text]) > 100


def test_results_pages_pick_reports_up_by_pattern(pages, tmp_path, monkeypatch):
    results = tmp_path / "benchmarks" / "results"
    quality = results / "lr-selected"
    quality.mkdir(parents=True)
    (quality / "newsuite.md").write_text(
        "### New suite on a model (reported split, final runs)\n\n![plot](newsuite.png)\n"
    )
    (quality / "newsuite.png").write_bytes(b"png")
    (quality / "newsuite.json").write_text(json.dumps({"suite": "newsuite", "rows": {}, "verdicts": []}))
    (results / "learning-curve-newsuite-lora-lr0.001-90steps.md").write_text("| step |\n")
    (results / "old.md").write_text("**SUPERSEDED**: kept for the record.\n\n### Old table\n")
    monkeypatch.setattr(pages, "ROOT", tmp_path)
    monkeypatch.setattr(pages, "RESULTS", results)
    monkeypatch.setattr(pages, "QUALITY", quality)
    generated = pages.results_pages()
    assert generated["results/newsuite.md"].startswith("# Quality: New suite on a model")
    assert generated["results/newsuite.png"] == b"png"
    assert "newsuite, lora, lr 0.001, 90 steps" in generated["results/learning-curves.md"]
    assert "Old table" in generated["results/history.md"] and "results/old.md" not in generated
    assert "[Quality: New suite on a model](newsuite.md)" in generated["results/index.md"]
    assert {"Quality: New suite on a model": "results/newsuite.md"} in pages.results_nav()
    assert "New suite on a model" in pages.headline_results()


def test_optional_pages_leave_the_nav_until_their_file_exists(pages, tmp_path):
    nav = [{"Tasks": [{"Built-in": "tasks.md"}, {"Yours": "your-own-tasks.md"}]}, {"Results": "results/index.md"}]
    resolved = pages._resolve_nav(nav, tmp_path)
    assert resolved[0] == {"Tasks": [{"Built-in": "tasks.md"}]}
    assert resolved[1]["Results"][0] == {"Overview": "results/index.md"}
    (tmp_path / "your-own-tasks.md").write_text("# Yours\n")
    assert pages._resolve_nav(nav, tmp_path)[0] == nav[0]
