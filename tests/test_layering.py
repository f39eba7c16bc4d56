"""Imports run one way: every module imports only its own package or packages on a lower floor (``FLOOR``); the
methods stand on routing, the loss collector, contrastive, gating and models (a merge dequantizes a quantized base)
and on the shared modules beside ``methods/base.py``, and no method imports another method.

Checked by parsing every ``import`` statement of the package (``ast``), so a violation names the file and line.
"""

import ast
from pathlib import Path

import pyramid_peft

PACKAGE = Path(pyramid_peft.__file__).parent
FLOORS = {"routing", "losses", "contrastive", "gating", "models"}  # what methods may stand on, outside methods/
SHARED = {"base", "capabilities", "config_base", "mixture", "spec", "task_contrastive"}  # beside methods/base.py
# The floors of the house, lowest first: a module may import its own package and anything on a lower floor.
FLOOR = {
    **dict.fromkeys(["atomic", "routing", "gating", "tasks", "models"], 0),
    **dict.fromkeys(["contrastive", "losses", "metrics", "data"], 1),
    "methods": 2,
    **dict.fromkeys(["registry", "merge", "accounting", "convert"], 3),
    "training": 4,
    "analysis": 5,
    "cli": 6,
}


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute dotted module) for every import of this package in ``path`` (a file under ``root``)."""
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            names = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("pyramid_peft")]


def violations_of_methods(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted((root / "methods").rglob("*.py")):
        own = path.relative_to(root / "methods").parts
        for line, name in imported_modules(path, root):
            parts = name.split(".")[1:]
            if parts and parts[0] == "methods":
                inner = parts[1:]
                allowed = not inner or inner[0] in SHARED or (len(own) > 1 and inner[0] == own[0])
                allowed = allowed or (path.name == "__init__.py" and len(own) == 1)  # methods/__init__ lists them
            else:
                allowed = bool(parts) and parts[0] in FLOORS
            if not allowed:
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


def test_methods_import_only_their_floors_and_the_shared_modules():
    assert violations_of_methods() == []


def test_the_floors_do_not_import_the_methods():
    files = sorted(
        path for floor in FLOORS for path in [*PACKAGE.glob(f"{floor}.py"), *PACKAGE.glob(f"{floor}/**/*.py")]
    )
    assert {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in files} == FLOORS
    bad = [
        f"{path.relative_to(PACKAGE)}:{line} imports {name}"
        for path in files
        for line, name in imported_modules(path)
        if name.startswith("pyramid_peft.methods")
    ]
    assert bad == []


def test_the_check_sees_an_upward_import(tmp_path):
    root = tmp_path / "pyramid_peft"
    (root / "methods" / "ept").mkdir(parents=True)
    (root / "methods" / "ept" / "_probe_upward.py").write_text(
        "from ...merge import merge_for_task\nfrom ..moelora import MoeLoraConfig\nfrom ..base import RoutedLayer\n"
    )
    found = violations_of_methods(root)
    assert found == [
        "methods/ept/_probe_upward.py:1 imports pyramid_peft.merge",
        "methods/ept/_probe_upward.py:2 imports pyramid_peft.methods.moelora",
    ]


def violations_of_floors(root: Path = PACKAGE) -> list[str]:
    """Imports of a higher floor, of another package on the same floor, or of the package front (``from .. import``,
    which runs every registration), by any module below the CLI."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        top = path.relative_to(root).parts[0].removesuffix(".py")
        if top == "__init__":
            continue  # the package front re-exports from every floor
        for line, name in imported_modules(path, root):
            target = name.split(".")[1:2]
            if not target or target[0] not in FLOOR:
                allowed = top == "cli"  # the front, or a name imported from it
            else:
                allowed = target[0] == top or FLOOR[target[0]] < FLOOR[top]
            if not allowed:
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


def test_every_top_level_module_has_a_floor():
    modules = {
        p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert modules - {"__init__"} == set(FLOOR)


def test_no_module_imports_a_floor_above_it():
    assert violations_of_floors() == []


def test_the_floor_check_sees_upward_and_front_imports(tmp_path):
    root = tmp_path / "pyramid_peft"
    (root / "data").mkdir(parents=True)
    (root / "data" / "probe.py").write_text(
        "from ..training import train\nfrom .. import EptConfig\nfrom ..metrics import compute_metrics\n"
        "from ..tasks import get_task\n"
    )
    assert violations_of_floors(root) == [
        "data/probe.py:1 imports pyramid_peft.training",
        "data/probe.py:2 imports pyramid_peft.EptConfig",
        "data/probe.py:3 imports pyramid_peft.metrics",
    ]


# -- no two modules import each other ----------------------------------------------------------------------------
BENCHMARKS = PACKAGE.parents[1] / "benchmarks"


def runtime_imports(path: Path) -> set[str]:
    """Dotted names imported by ``path`` when it runs: every import statement, at any depth, except those under
    ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for statement in node.body
        for child in ast.walk(statement)
    }
    if path.is_relative_to(PACKAGE):
        return {name for line, name in imported_modules(path) if not _line_skipped(tree, line, skipped)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _line_skipped(tree: ast.AST, line: int, skipped: set[int]) -> bool:
    return any(
        id(node) in skipped
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno == line
    )


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for the package and the benchmark scripts (which import their siblings by name)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    files.update({path.stem: path for path in BENCHMARKS.glob("*.py")})
    return files


def owning_module(name: str, files: dict[str, Path]) -> str | None:
    """The module a dotted import name lands in (``pyramid_peft.training.config.ConfigError`` -> its module)."""
    parts = name.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in files), None)


def mutual_imports(files: dict[str, Path]) -> list[str]:
    graph = {
        module: {owning_module(name, files) for name in runtime_imports(path)} - {None, module}
        for module, path in files.items()
    }
    return sorted(f"{a} <-> {b}" for a, targets in graph.items() for b in targets if a < b and a in graph.get(b, ()))


def test_no_two_modules_import_each_other():
    assert mutual_imports(module_files()) == []


def test_the_mutual_import_check_sees_a_circle_and_skips_annotation_imports(tmp_path):
    (tmp_path / "first.py").write_text("import third\n\n\ndef late():\n    from second import thing\n")
    (tmp_path / "second.py").write_text("from first import late\n")
    (tmp_path / "third.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import first\n")
    files = {path.stem: path for path in tmp_path.glob("*.py")}
    assert mutual_imports(files) == ["first <-> second"]


def test_merge_and_convert_read_the_methods_through_the_shared_modules_only():
    """Each method's merge (TuckA's route) and checkpoint converter live in its folder and register themselves."""
    for module in ("merge.py", "convert.py"):
        named = [name.split(".") for _, name in imported_modules(PACKAGE / module)]
        methods = [parts for parts in named if parts[1:2] == ["methods"] and len(parts) > 2]
        assert methods and all(parts[2] in SHARED for parts in methods), module
