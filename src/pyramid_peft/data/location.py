"""Where the local data folder is, and the error every data source raises (:mod:`.sources` for the built-in
tasks, :mod:`.declared` for the tasks a config declares)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "EPT_DATA_DIR"


class DataSourceError(RuntimeError):
    """Raised when a task's examples cannot be loaded, or a row of them is malformed."""


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: ``explicit`` if given, else ``$EPT_DATA_DIR``, else ``shared/data`` beside the
    repository (:func:`shared_data_dir`), else None (use the hub). The same order as ``scripts/env.sh``."""
    value = explicit if explicit is not None else os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else shared_data_dir()


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout, if it exists: the checkout is the repository this package was
    installed from in editable mode (found from the package's own location), or else the current folder."""
    package_root = Path(__file__).resolve().parents[3]  # src/pyramid_peft/data/location.py -> the repository
    roots = [package_root] if (package_root / "pyproject.toml").is_file() else []
    for root in [*roots, Path.cwd()]:
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate  # as found: a data folder reached through a symbolic link is recorded by that name
    return None
