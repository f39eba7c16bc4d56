"""Benchmark scripts import their siblings (``common``, ``quality``) by name: tests import them the same way."""

import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def import_benchmark(name: str):
    """The module ``benchmarks/<name>.py``, imported with ``benchmarks/`` on ``sys.path`` as the script sees it."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
