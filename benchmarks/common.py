"""Helpers shared by the benchmarks: machine description, interleaved timing, memory probes, Markdown output."""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a reader needs to interpret the timings: hardware, library versions, threads, date and load."""
    import peft
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
    }


def interleaved(steps: dict[str, Callable[[], object]], rounds: dict[str, int], warmup: int = 1) -> dict[str, list]:
    """Time each step round-robin (ABCABC...) so that machine noise falls on all of them alike.

    ``rounds[name]`` is how many timed calls ``name`` gets; a step with fewer rounds drops out of the rotation
    once it has them. Every step is first called ``warmup`` times untimed. A step that raises is recorded as its
    exception and leaves the rotation. Returns ``{name: [seconds, ...]}`` or ``{name: exception}``.
    """
    results: dict[str, list | Exception] = {name: [] for name in steps}
    for _ in range(warmup):
        for name, step in steps.items():
            _timed(step, name, results)
    for name in steps:
        if isinstance(results[name], list):
            results[name].clear()
    for i in range(max(rounds.values(), default=0)):
        for name, step in steps.items():
            if i < rounds[name] and isinstance(results[name], list):
                _timed(step, name, results)
    return results


def _timed(step: Callable[[], object], name: str, results: dict) -> None:
    if isinstance(results[name], Exception):
        return
    gc.collect()
    try:
        start = time.perf_counter()
        step()
        results[name].append(time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a failing variant is reported, the others go on
        results[name] = err


UNITS = {"s": 1.0, "ms": 1e3}


def summarize(seconds: list[float], unit: str = "ms") -> dict:
    """Median and spread (min, max) of a list of timings, in ``unit`` (``"s"`` or ``"ms"``)."""
    scale = UNITS[unit]
    return {
        "median": statistics.median(seconds) * scale,
        "min": min(seconds) * scale,
        "max": max(seconds) * scale,
        "n": len(seconds),
        "unit": unit,
    }


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> tuple[torch.Tensor, int]:
    """Run ``fn`` and count the bytes autograd saves for its backward pass (unique storages).

    Storages whose ``data_ptr`` is in ``exclude`` (the parameters) are not counted: what remains is the
    activation memory the forward pass holds until the backward pass frees it.
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(storages.values())


def storage_pointers(module: torch.nn.Module) -> set[int]:
    """``data_ptr`` of the storage of every parameter and buffer of ``module``."""
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors}


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """This process's resident set size now, in MiB (None where /proc is missing)."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs``), so that loading does not set the peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's peak resident set size since start or the last :func:`reset_peak_rss`, in MiB."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; floats are printed with three significant digits, ``None`` as a dash."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path, results: dict, report: str) -> None:
    """``results`` as JSON at ``out`` and the Markdown ``report`` beside it (``.md``); the report is printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(report)
    print(report)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
