"""Every snippet the README and the docs mark runnable runs, so the docs cannot drift from the code.

Marker convention: an HTML comment on the line before a fenced ``bash`` or ``python`` block.

* ``<!-- runnable -->``: the block runs as written (shell blocks with ``bash -e``, Python blocks with this
  interpreter), in a scratch folder that links the repository's ``configs``, ``benchmarks`` and ``scripts``, so
  relative paths resolve and every file the snippet writes lands in the scratch folder.
* ``<!-- runnable: check -->``: for commands too long to run here (the quickstart, the whole test suite, a quality
  suite): each line is checked without the long run. ``bash FILE``: the file exists and parses (``bash -n``);
  ``ept CMD ...``: ``ept CMD --help`` succeeds and every ``--flag`` on the line is one the command documents (for
  ``train`` and ``params``, whose flags are config keys, the config and its overrides must load);
  ``python FILE ...``: ``python FILE --help`` succeeds and documents every ``--flag`` on the line.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKED_BLOCK = re.compile(r"^<!--\s*runnable(?::\s*(\w+))?\s*-->\s*\n```(\w+)\n(.*?)^```", re.M | re.S)
LINKED = ("configs", "benchmarks", "scripts", "src")
TIMEOUT = 600


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    mode: str  # "run" or "check"
    language: str
    code: str

    @property
    def name(self) -> str:
        page = self.page.relative_to(ROOT).as_posix() if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    """The blocks of ``page`` marked runnable; an unknown mode or language is an error naming the line."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in MARKED_BLOCK.finditer(text):
        mode, language = match.group(1) or "run", match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        if (mode, language) not in (("run", "bash"), ("run", "python"), ("check", "bash")):
            raise ValueError(f"{page}:{line}: runnable blocks are bash or python, mode run or check (check: bash only)")
        found.append(Snippet(page, line, mode, language, match.group(3)))
    return found


def run_snippet(snippet: Snippet, workdir: Path) -> tuple[bool, str]:
    """Run or check ``snippet`` in ``workdir``; returns whether it passed and what it printed."""
    for name in LINKED:
        if not (workdir / name).exists():
            (workdir / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if snippet.mode == "check":
        return _check_lines(snippet.code, workdir, env)
    if snippet.language == "python":
        return _run([sys.executable, "-c", snippet.code], workdir, env)
    return _run(["bash", "-e", "-c", snippet.code], workdir, env)


def _run(command: list[str], workdir: Path, env: dict) -> tuple[bool, str]:
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return done.returncode == 0, f"$ {shlex.join(command)}\n{done.stdout}{done.stderr}"


def _check_lines(code: str, workdir: Path, env: dict) -> tuple[bool, str]:
    log = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        ok, output = _check_command(words, workdir, env)
        log.append(output)
        if not ok:
            return False, "\n".join(log)
    return True, "\n".join(log)


def _check_command(words: list[str], workdir: Path, env: dict) -> tuple[bool, str]:
    program, args = words[0], words[1:]
    flags = [w.split("=")[0] for w in args if w.startswith("--")]
    if program == "bash":
        script = workdir / args[0]
        if not script.is_file():
            return False, f"{args[0]}: no such script"
        return _run(["bash", "-n", str(script)], workdir, env)
    if program == "python":
        ok, output = _run([sys.executable, args[0], "--help"], workdir, env)
        return _flags_documented(ok, output, flags)
    if program == "ept":
        return _check_ept(args, flags, workdir, env)
    return False, f"{program}: a check block may hold bash, python or ept commands only"


def _check_ept(args: list[str], flags: list[str], workdir: Path, env: dict) -> tuple[bool, str]:
    """In this process (no new interpreter per line): the command's parser, its help, and the config it names."""
    from pyramid_peft.cli import build_parser
    from pyramid_peft.training import ConfigError, load_config

    parser, path = build_parser(), []
    while args and (choices := _subcommands(parser)) and args[0] in choices:
        parser = choices[args[0]]
        path.append(args.pop(0))
    output = f"$ ept {' '.join(path)} --help\n{parser.format_help()}"
    if path and path[0] in ("train", "params") and args:
        overrides = [a for a in args if a not in ("--overwrite", "--resume_from_checkpoint")]
        config = workdir / overrides[0]
        if path[0] == "params" and not config.is_file():
            return True, output  # params also takes a model name, which its own run checks
        try:
            load_config(config, overrides[1:])
        except ConfigError as err:
            return False, f"{output}\n{err}"
        return True, output
    return _flags_documented(bool(path), output, flags)


def _subcommands(parser) -> dict:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _flags_documented(ok: bool, output: str, flags: list[str]) -> tuple[bool, str]:
    missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", output)]
    if missing:
        return False, f"{output}\nnot documented by --help: {missing}"
    return ok, output


ALL = [snippet for page in PAGES for snippet in snippets(page)]


def test_the_readme_and_the_docs_mark_snippets_runnable():
    names = {s.page.name for s in ALL}
    assert {"README.md", "getting-started.md", "import-export.md"} <= names
    assert any(s.mode == "check" for s in ALL) and any(s.mode == "run" for s in ALL)


@pytest.mark.slow
@pytest.mark.parametrize("snippet", ALL, ids=[s.name for s in ALL])
def test_snippet_runs(snippet, tmp_path, ept_data_dir, monkeypatch):
    monkeypatch.setenv("EPT_DATA_DIR", str(ept_data_dir))
    ok, output = run_snippet(snippet, tmp_path)
    assert ok, f"{snippet.name} failed:\n{output[-4000:]}"


BROKEN_PAGE = """# A page

<!-- runnable -->
```python
import json

json.loads("{not json")
```

<!-- runnable: check -->
```bash
ept eval --no-such-flag runs/x
```

<!-- runnable: check -->
```bash
bash scripts/no-such-script.sh
```
"""


def test_a_page_with_broken_snippets_fails_each_of_them(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text(BROKEN_PAGE)
    found = snippets(page)
    assert [s.mode for s in found] == ["run", "check", "check"]
    results = []
    for number, snippet in enumerate(found):
        (tmp_path / str(number)).mkdir()
        results.append(run_snippet(snippet, tmp_path / str(number)))
    assert [ok for ok, _ in results] == [False, False, False]
    assert "JSONDecodeError" in results[0][1] and "--no-such-flag" in results[1][1]
    assert "no such script" in results[2][1]


def test_a_working_snippet_passes_and_an_unknown_marker_is_named(tmp_path):
    page = tmp_path / "fine.md"
    run, check = "<!-- runnable -->", "<!-- runnable: check -->"
    page.write_text(f"{run}\n```bash\necho fine > out.txt\n```\n\n{check}\n```bash\nbash scripts/test.sh\n```\n")
    first, second = snippets(page)
    assert run_snippet(first, tmp_path)[0]
    assert (tmp_path / "out.txt").read_text() == "fine\n"
    assert run_snippet(second, tmp_path)[0]
    page.write_text("<!-- runnable: maybe -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="fine.md:1"):
        snippets(page)
