"""The documentation pages generated from the code and from ``benchmarks/results/``, and the README's results lines.

MkDocs runs this file as a hook (``mkdocs.yml``: ``hooks``), so ``mkdocs build`` and ``mkdocs serve`` write:

* ``reference/cli.md``: every ``ept`` command and flag, read from the argparse parser;
* ``reference/config.md``: every section and key of an experiment config, with its type, default and meaning,
  read from the config dataclasses, the method configs and ``Seq2SeqTrainingArguments``;
* ``reference/api.md``: one mkdocstrings entry per name in ``pyramid_peft.__all__``;
* ``results/*.md``: one page per benchmark report under ``benchmarks/results/`` (picked up by file name pattern,
  so a new report appears without edits), the superseded ones on ``results/history.md``;
* ``contributing.md`` and ``changelog.md`` from the files at the repository root.

From the command line it keeps the README's headline results in step with the same reports::

    python scripts/docs_pages.py readme           # rewrite the generated lines of README.md
    python scripts/docs_pages.py readme --check   # exit 1 when README.md and benchmarks/results/ disagree
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUALITY = RESULTS / "lr-selected"
SUPERSEDED_MARK = "SUPERSEDED"
README_BEGIN = "<!-- results: begin (python scripts/docs_pages.py readme writes these lines) -->"
README_END = "<!-- results: end -->"
# Pages other branches add; listed in the nav, dropped from it while the file is absent.
OPTIONAL_PAGES = ("your-own-tasks.md", "sharded-training.md")
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")

if str(ROOT / "src") not in sys.path:  # document the checkout's code, not an installed copy
    sys.path.insert(0, str(ROOT / "src"))


# ---------------------------------------------------------------- the CLI reference


def cli_reference() -> str:
    """Markdown for every ``ept`` command, sub-command and flag, walked from ``pyramid_peft.cli.build_parser``."""
    from pyramid_peft.cli import build_parser

    lines = [
        "# `ept` command line",
        "",
        "Generated from the argparse parser of `pyramid_peft.cli` when the docs are built.",
        "`ept train` and `ept params` also take config overrides (`--key value`, dotted for a section):",
        "every key of the [experiment config](config.md) can be given that way.",
        "",
    ]
    _parser_section(build_parser(), "ept", 2, lines)
    return "\n".join(lines) + "\n"


def _parser_section(parser: argparse.ArgumentParser, name: str, level: int, lines: list[str]) -> None:
    lines += [f"{'#' * level} `{name}`", ""]
    if parser.description:
        lines += [parser.description, ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    rows, groups = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            groups += [(sub, f"{name} {sub_name}", helps.get(sub_name)) for sub_name, sub in action.choices.items()]
        elif not isinstance(action, argparse._HelpAction):
            rows.append(_argument_row(action))
    if rows:
        lines += ["| argument | default | meaning |", "| --- | --- | --- |", *rows, ""]
    if groups:
        lines += ["| command | what it does |", "| --- | --- |"]
        lines += [f"| `{sub_name}` | {_cell(help_text or '')} |" for _, sub_name, help_text in groups]
        lines.append("")
    for sub, sub_name, _ in groups:
        _parser_section(sub, sub_name, min(level + 1, 4), lines)


def _argument_row(action: argparse.Action) -> str:
    if action.option_strings:
        flag = ", ".join(action.option_strings)
        if action.nargs != 0:
            flag += f" {action.metavar or action.dest.upper()}"
    else:
        flag = action.metavar or action.dest
        flag = f"{flag} ..." if action.nargs in (argparse.REMAINDER, "*", "+") else flag
    notes = []
    if action.required and action.option_strings:
        notes.append("required")
    if action.choices:
        notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
    meaning = "; ".join([_cell(action.help or ""), *notes]).strip("; ")
    return f"| `{flag}` | {default} | {meaning} |"


# ---------------------------------------------------------------- the experiment-config reference


def config_reference() -> str:
    """Markdown for every section and key of an experiment config: type, default and meaning, from the code."""
    from transformers import Seq2SeqTrainingArguments

    from pyramid_peft.training import config as config_module

    lines = [
        "# Experiment config",
        "",
        "Generated from the config dataclasses of `pyramid_peft.training.config`, the method configs and",
        "`transformers.Seq2SeqTrainingArguments` when the docs are built. A config is a YAML file of these",
        "sections; on the command line `--section.key value` (or `--key value` for a training field) overrides it.",
        "",
        _docstring_text(config_module.__doc__ or ""),
        "",
    ]
    root = config_module.ExperimentConfig
    for section in dataclasses.fields(root):
        lines += [f"## `{section.name}`", ""]
        value = _default(section)
        if section.name == "method":
            lines += _method_section(value)
        elif section.name == "training":
            lines += _training_section(Seq2SeqTrainingArguments, getattr(config_module, "TRAINING_DEFAULTS", {}))
        elif dataclasses.is_dataclass(value):
            lines += [_docstring_text(type(value).__doc__ or ""), ""]
            lines += _key_table(type(value), section.name)
        else:
            lines += _plain_section(section)
    return "\n".join(lines) + "\n"


def _method_section(method) -> list[str]:
    from peft import PeftConfig

    from pyramid_peft.registry import METHODS, method_names

    base_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    lines = [
        _docstring_text(type(method).__doc__ or ""),
        "",
        f"`name`: one of {', '.join(f'`{n}`' for n in method_names())}, or `full` (full fine-tuning, no adapter);",
        f"default `{method.name}`. The other keys are the keyword arguments of the method's config class:",
        "`lora` takes those of [`peft.LoraConfig`](https://huggingface.co/docs/peft/package_reference/lora).",
        "",
    ]
    for name in sorted(METHODS):
        cls = METHODS[name].config_cls
        lines += [f"### `method.name: {name}` ({cls.__name__})", ""]
        lines += _key_table(cls, "method", skip=base_fields)
    return lines


def _training_section(arguments_cls, defaults: dict) -> list[str]:
    lines = [
        "Exactly the fields of `transformers.Seq2SeqTrainingArguments` "
        "([its documentation](https://huggingface.co/docs/transformers/main_classes/trainer)).",
    ]
    if defaults:
        changed = ", ".join(f"`{key}: {value!r}`" for key, value in defaults.items())
        lines.append(f"Defaults that differ from the stock ones, for a multi-task run: {changed}.")
    lines += ["", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(arguments_cls):
        if not f.init or f.name.startswith("_"):
            continue
        default = defaults.get(f.name, _default(f))
        lines.append(
            f"| `{f.name}` | {_type_cell(f.type)} | {_value_cell(default)} | {_cell(f.metadata.get('help', ''))} |"
        )
    return [*lines, ""]


def _plain_section(section) -> list[str]:
    lines = [f"Type `{_type_name(section.type)}`, default {_value_cell(_default(section))}."]
    if section.name == "tasks":
        from pyramid_peft import tasks

        names = list(getattr(tasks, "TASK_NAMES", ()))
        lines.append(
            "The tasks to train on, in task-id order. Built in: " + ", ".join(f"`{n}`" for n in names) + "."
            if names
            else "The tasks to train on, in task-id order."
        )
    return [*lines, ""]


def _key_table(cls, prefix: str, skip=frozenset()) -> list[str]:
    """One row per field of the dataclass ``cls`` (nested dataclasses as dotted keys)."""
    meanings = _argument_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or f.name.startswith("_"):
            continue
        default = _default(f)
        if dataclasses.is_dataclass(default):
            rows += _key_table(type(default), f"{prefix}.{f.name}")[2:-1]
            continue
        meaning = meanings.get(f.name) or f.metadata.get("help", "")
        rows.append(f"| `{prefix}.{f.name}` | {_type_cell(f.type)} | {_value_cell(default)} | {_cell(meaning)} |")
    return ["| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""]


def _argument_docs(cls) -> dict[str, str]:
    """``name -> description`` from the ``Args:`` sections of ``cls``'s docstring and its bases' (Google style)."""
    from griffe import Docstring

    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__doc__:
            continue
        sections = Docstring(klass.__doc__).parse("google", warn_missing_types=False, warn_unknown_params=False)
        for section in sections:
            if section.kind.value == "parameters":
                found.update({p.name: p.description for p in section.value})
    return found


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_name(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _type_cell(annotation) -> str:
    return f"`{_cell(_type_name(annotation))}`"


def _value_cell(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    text = repr(value.value if hasattr(value, "value") and not isinstance(value, (str, int, float)) else value)
    return f"`{_cell(text)}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("``", "`").replace("|", "\\|")


def _docstring_text(doc: str) -> str:
    """A docstring's prose as Markdown: reST double back-quotes become code spans, an indented ``::`` block a fence."""
    import inspect

    text = inspect.cleandoc(doc).replace("``", "`")
    text = re.sub(r"(\n\s*Args:\n(?:[ \t]+.*\n?|\n)*)", "\n", text).rstrip()
    return re.sub(
        r"::\n\n((?:    .*\n?|\n)+)", lambda m: ":\n\n```yaml\n" + inspect.cleandoc(m.group(1)) + "\n```\n\n", text
    )


# ---------------------------------------------------------------- the API reference


def api_reference() -> str:
    """One mkdocstrings entry per public name of ``pyramid_peft`` (its ``__all__``), grouped by kind."""
    import inspect

    from peft import PeftConfig

    import pyramid_peft

    groups: dict[str, list[str]] = {"Method configs": [], "Errors": [], "Other classes": [], "Functions": []}
    for name in pyramid_peft.__all__:
        obj = getattr(pyramid_peft, name)
        if inspect.isclass(obj) and issubclass(obj, PeftConfig):
            groups["Method configs"].append(name)
        elif inspect.isclass(obj) and issubclass(obj, Exception):
            groups["Errors"].append(name)
        elif inspect.isclass(obj):
            groups["Other classes"].append(name)
        else:
            groups["Functions"].append(name)
    lines = [
        "# API reference",
        "",
        "Everything `pyramid_peft` exports (its `__all__`), rendered from the docstrings when the docs are built.",
        "",
    ]
    for title, names in groups.items():
        if names:
            lines += [f"## {title}", ""]
            lines += [f"::: pyramid_peft.{name}\n" for name in names]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- results pages


@dataclasses.dataclass
class Report:
    """A Markdown report under ``benchmarks/results/`` and the page it becomes."""

    path: Path
    page: str  # docs path, e.g. "results/glue8.md"
    title: str
    superseded: bool


def reports() -> list[Report]:
    """Every report under ``benchmarks/results/``, by file name pattern (a new suite's report appears by itself)."""
    found = []
    for path in sorted(RESULTS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        superseded = SUPERSEDED_MARK in text
        if path.parent == QUALITY:
            page, title = f"results/{path.stem}.md", f"Quality: {_final_title(text) or path.stem}"
        elif path.parent == RESULTS:
            page, title = f"results/{path.stem}.md", _first_heading(text) or path.stem
        else:
            page, title = f"results/{path.parent.name}-{path.stem.lower()}.md", path.parent.name
            superseded = True  # a note about an old folder of run files
        found.append(Report(path, page, title.strip(), superseded))
    return found


def _first_heading(text: str) -> str | None:
    match = re.search(r"^#+\s+(.+)$", text, re.M)
    return match.group(1) if match else None


def _final_title(text: str) -> str | None:
    match = re.search(r"^#+\s+(.+?)\s*\(reported split, final runs\)", text, re.M)
    return match.group(1) if match else None


def _curve_title(path: Path) -> str:
    """``learning-curve-glue8-lora-lr0.001-900steps.md`` -> ``glue8, lora, lr 0.001, 900 steps``."""
    parts = path.stem.removeprefix("learning-curve-").split("-")
    return ", ".join(p.replace("lr", "lr ", 1) if p.startswith("lr") else p.replace("steps", " steps") for p in parts)


def results_pages() -> dict[str, str | bytes]:
    """``docs path -> content`` of the results pages and the images they show."""
    pages: dict[str, str | bytes] = {}
    current = [r for r in reports() if not r.superseded]
    curves = [r for r in current if r.path.name.startswith("learning-curve-")]
    singles = [r for r in current if r not in curves]
    for report in singles:
        pages[report.page] = f"# {report.title}\n\n" + _embed(report, pages, shift=1)
    if curves:
        body = ["# Learning curves", "", _CURVES_INTRO, ""]
        for report in curves:
            body += [f"## {_curve_title(report.path)}", "", f"`{_rel(report.path)}`", "", _embed(report, pages, 2)]
        pages["results/learning-curves.md"] = "\n".join(body)
    history = ["# History: superseded results", "", _HISTORY_INTRO, ""]
    for report in (r for r in reports() if r.superseded):
        history += [f"## {report.title} (`{_rel(report.path)}`)", "", _embed(report, pages, 2)]
    pages["results/history.md"] = "\n".join(history)
    pages["results/index.md"] = _results_index(singles, bool(curves))
    return pages


_CURVES_INTRO = (
    "Validation average every few steps of one method's run, used to choose (and test) the quality suites' budget. "
    "Written by `python benchmarks/learning_curve.py`; the command of each curve heads its file."
)
_HISTORY_INTRO = (
    "Results produced under an earlier protocol (one shared learning rate for every method, no validation split, "
    "no intervals). They are kept for the record, not as findings; the current suites are on the "
    "[results page](index.md)."
)


def _results_index(singles: list[Report], has_curves: bool) -> str:
    lines = [
        "# Results",
        "",
        "Every number on these pages is read from a report under `benchmarks/results/` when the docs are built;",
        "each report names the command that wrote it and the machine and load it ran on. How the quality suites",
        "choose learning rates, seeds and intervals: [the protocol](../benchmarks.md).",
        "",
        README_BEGIN,
        headline_results(for_docs=True),
        README_END,
        "",
        "| page | report |",
        "| --- | --- |",
    ]
    for report in singles:
        lines.append(f"| [{_cell(report.title)}]({Path(report.page).name}) | `{_rel(report.path)}` |")
    if has_curves:
        lines.append("| [Learning curves](learning-curves.md) | `benchmarks/results/learning-curve-*.md` |")
    lines.append("| [History: superseded results](history.md) | the earlier protocol's reports |")
    return "\n".join(lines) + "\n"


def _embed(report: Report, pages: dict, shift: int) -> str:
    """The report's text, its headings pushed down ``shift`` levels below the page's, its images copied beside it."""
    text = report.path.read_text(encoding="utf-8")
    text = re.sub(r"^(#+)\s", lambda m: "#" * min(len(m.group(1)) + shift, 6) + " ", text, flags=re.M)
    if re.match(r"#+ ", text) and report.path.parent == RESULTS and shift == 1:  # the page title replaces it
        text = text.split("\n", 1)[1]
    page_dir = Path(report.page).parent

    def copy_image(match: re.Match) -> str:
        source = (report.path.parent / match.group(2)).resolve()
        if not source.is_file():
            return match.group(0)
        pages[str(page_dir / source.name)] = source.read_bytes()
        return f"![{match.group(1)}]({source.name})"

    return IMAGE_LINK.sub(copy_image, text).strip() + "\n"


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------- headline results (README and results index)


def headline_results(for_docs: bool = False) -> str:
    """One line per quality suite (``benchmarks/results/lr-selected/*.json``): EPT's average against LoRA's and the
    best row's, and EPT's verdicts against peers with at least its parameters per task."""
    lines = []
    for path in sorted(QUALITY.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        report = path.with_suffix(".md")
        title = _final_title(report.read_text(encoding="utf-8")) if report.is_file() else None
        page = f"{path.stem}.md" if for_docs else _rel(report)
        lines.append(f"- **[{title or data.get('suite', path.stem)}]({page})**: {_suite_summary(data)}")
    return "\n".join(lines)


def _suite_summary(data: dict) -> str:
    rows = data.get("rows", {})
    means = {name: sum(row["average"]) / len(row["average"]) for name, row in rows.items() if row.get("average")}
    trained = {name: mean for name, mean in means.items() if rows[name].get("chosen_learning_rate") is not None}
    if not trained:
        floors = ", ".join(f"{name} {mean:.1f}" for name, mean in means.items())
        return f"no trained method has final runs yet (untrained floor: {floors or 'none'})."
    seeds = max(len(rows[name]["average"]) for name in trained)
    ept = next((name for name in trained if name.startswith("ept")), None)
    best = max(trained, key=trained.get)
    shown = [name for name in (ept, "lora", best) if name in trained]
    averages = ", ".join(f"{name} {trained[name]:.1f}" for name in dict.fromkeys(shown))
    text = f"average over up to {seeds} seeds at each method's chosen learning rate: {averages} (best: {best})"
    verdicts = [v for v in data.get("verdicts", []) if v.get("ept") == ept]
    if verdicts:
        by_word: dict[str, list[str]] = {}
        for verdict in verdicts:
            by_word.setdefault(verdict["word"], []).append(verdict["peer"])
        said = "; ".join(f"{word}: {', '.join(peers)}" for word, peers in by_word.items())
        text += f". {ept} against peers with at least its parameters per task: {said}"
    return text + "."


def readme_with_results(readme: str) -> str:
    """``readme`` with the lines between the results markers regenerated."""
    if README_BEGIN not in readme or README_END not in readme:
        raise SystemExit(f"README.md lacks the markers {README_BEGIN!r} and {README_END!r}: put them back.")
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{headline_results()}\n{README_END}{tail}"


# ---------------------------------------------------------------- everything, and the MkDocs hook


def generated_pages() -> dict[str, str | bytes]:
    """``docs path -> content`` of every generated page and image."""
    pages: dict[str, str | bytes] = {
        "reference/cli.md": cli_reference(),
        "reference/config.md": config_reference(),
        "reference/api.md": api_reference(),
        "contributing.md": (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"),
        "changelog.md": (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"),
    }
    pages.update(results_pages())
    return pages


def results_nav() -> list:
    """The nav entries of the results pages: the overview, each report's page, the curves, the history."""
    pages = results_pages()
    singles = [r for r in reports() if not r.superseded and not r.path.name.startswith("learning-curve-")]
    nav = [{"Overview": "results/index.md"}, *({r.title: r.page} for r in singles)]
    if "results/learning-curves.md" in pages:
        nav.append({"Learning curves": "results/learning-curves.md"})
    return [*nav, {"History (superseded)": "results/history.md"}]


def on_config(config):
    """Fill the nav's Results section from the reports found, and drop optional pages that are not there yet."""
    docs_dir = Path(config["docs_dir"])
    config["nav"] = _resolve_nav(config["nav"], docs_dir)
    return config


def _resolve_nav(entries: list, docs_dir: Path) -> list:
    resolved = []
    for entry in entries:
        if isinstance(entry, dict):
            ((title, target),) = entry.items()
            if title == "Results":
                target = results_nav()
            elif isinstance(target, list):
                target = _resolve_nav(target, docs_dir)
            elif target in OPTIONAL_PAGES and not (docs_dir / target).is_file():
                continue
            resolved.append({title: target})
        else:
            resolved.append(entry)
    return resolved


def on_files(files, config):
    """Add the generated pages and images to the site."""
    from mkdocs.structure.files import File

    for path, content in generated_pages().items():
        existing = files.get_file_from_path(path)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, path, content=content))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Keep the README's headline results in step with the reports.")
    parser.add_argument("what", choices=("readme",))
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the reports")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to write or check")
    args = parser.parse_args(argv)
    readme = args.readme
    text = readme.read_text(encoding="utf-8")
    wanted = readme_with_results(text)
    if args.check:
        if wanted != text:
            print("README.md's results lines differ from benchmarks/results/: run python scripts/docs_pages.py readme")
            return 1
        print("README.md's results lines match benchmarks/results/")
        return 0
    readme.write_text(wanted, encoding="utf-8")
    print("README.md: results lines written from benchmarks/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
