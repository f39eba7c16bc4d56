"""Import adapters trained with another codebase (the public EPT code, the public TuckA code) into pyramid-peft
adapter folders.

SRC is what that code's ``save_pretrained`` writes: ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, read with ``weights_only=True``). Its keys are ``base_model.model.<module>.<tensor>``. Each
method that can import such a checkpoint registers a :class:`~pyramid_peft.methods.spec.Converter` in its own
folder (the tensor names it reads, the mapping, the shapes to check against a base model); this module reads the
folder, splits it by module, checks it against the base model and writes the result atomically. The sources
offered (``ept convert --from``) are the registered converters.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import methods  # noqa: F401  (importing the methods registers their converters)
from .atomic import atomic_directory
from .methods.spec import CONVERTERS, PREFIX, ConversionError, Converter

__all__ = ["ConversionError", "convert_reference", "converter_sources"]


def converter_sources() -> list[str]:
    """The ``--from`` names of the registered converters."""
    return sorted(CONVERTERS)


def convert_reference(
    src,
    out,
    source: str = "ept-code",
    base_model: nn.Module | None = None,
    top_k: int | None = None,
    num_tasks: int | None = None,
    gate: str | None = None,
) -> Path:
    """Convert the public code's adapter folder ``src`` into a pyramid-peft adapter folder ``out`` (atomically).

    Args:
        src: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` or ``adapter_model.bin``.
        out: the folder to write; ``PeftModel.from_pretrained(base, out)`` loads it.
        source: ``"ept-code"`` or ``"tucka-code"``.
        base_model: the model the adapter was trained on (weights unused; a meta-device copy will do): each
            adapted module must exist in it as an ``nn.Linear`` of the sizes the tensors imply.
        top_k: experts per task (EPT; default 2, the public code's value).
        num_tasks: task ids (EPT default: the rows of the task table, 8 in the public code; fewer keeps the first
            rows; TuckA default 8, its output ignores them).
        gate: ``"code"`` (the public double softmax, default) or ``"paper"`` (EPT).
    """
    if source not in CONVERTERS:
        raise ConversionError(f"source={source!r} is not one of {converter_sources()}.")
    converter = CONVERTERS[source]
    given = {"top_k": top_k, "num_tasks": num_tasks, "gate": gate}
    unused = [name for name, value in given.items() if value is not None and name not in converter.options]
    if unused:
        raise ConversionError(f"{unused} do not apply to {source} checkpoints (it takes {list(converter.options)}).")
    src = Path(src)
    settings, tensors = read_checkpoint(src)
    modules = split_by_module(tensors, src, converter)
    options = {name: value for name, value in given.items() if name in converter.options}
    config, state = converter.convert(modules, settings, src, **options)
    if base_model is not None:
        check_against_base(config, modules, base_model, src, converter)
    with atomic_directory(out) as staging:
        config.save_pretrained(staging)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(staging) / "adapter_model.safetensors"))
    return Path(out)


# -- reading ---------------------------------------------------------------------------------------------------------
def read_checkpoint(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the saved tensors) of a PEFT-style adapter folder."""
    config_file = src / "adapter_config.json"
    if not config_file.is_file():
        raise ConversionError(
            f"{src} has no adapter_config.json: give the folder that the public code's save_pretrained wrote."
        )
    try:
        settings = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_file} is not valid JSON ({err}).") from err
    for name, load in (("adapter_model.safetensors", _load_safetensors), ("adapter_model.bin", _load_bin)):
        if (src / name).is_file():
            return settings, load(src / name)
    raise ConversionError(f"{src} has neither adapter_model.safetensors nor adapter_model.bin.")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ConversionError(f"{path} is not a readable safetensors file ({err}).") from err


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors: the file is not a plain tensor checkpoint
        raise ConversionError(
            f"{path} is not a PyTorch tensor checkpoint readable with weights_only=True ({err})."
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a dict of tensors.")
    return state


def split_by_module(
    tensors: dict[str, torch.Tensor], src: Path, converter: Converter
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {tensor name: tensor}}`` from keys ``base_model.model.<module>.<tensor>``."""
    pattern = re.compile(rf"(.+?)\.({converter.tensor_names})$")
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        match = pattern.match(key[len(PREFIX) :]) if key.startswith(PREFIX) else None
        if match is None:
            raise ConversionError(
                f"key {key!r} in {src} is not a tensor of {converter.description} (expected "
                f"'{PREFIX}<module>.<tensor>' with a tensor name matching {converter.tensor_names!r}); "
                f"is it a checkpoint of another source ({', '.join(converter_sources())})?"
            )
        modules[match.group(1)][match.group(2)] = value
    if not modules:
        raise ConversionError(f"{src} holds no tensors.")
    return dict(modules)


# -- checks against the base model -----------------------------------------------------------------------------------
def check_against_base(
    config, modules: dict[str, dict[str, torch.Tensor]], base_model: nn.Module, src: Path, converter: Converter
) -> None:
    """Every source module exists in ``base_model`` as an ``nn.Linear`` whose sizes its tensors fit."""
    for name, parts in modules.items():
        try:
            linear = base_model.get_submodule(name)
        except AttributeError:
            raise ConversionError(
                f"key '{PREFIX}{name}.{next(iter(parts))}' in {src} names module {name!r}, which the base model does "
                "not have."
            ) from None
        if not isinstance(linear, nn.Linear):
            raise ConversionError(f"module {name!r} of the base model is a {type(linear).__name__}, not an nn.Linear.")
        for tensor, shape in converter.expected_shapes(config, linear).items():
            if tensor in parts and tuple(parts[tensor].shape) != shape:
                raise ConversionError(
                    f"key '{PREFIX}{name}.{tensor}' has shape {tuple(parts[tensor].shape)}, but module {name!r} of the "
                    f"base model ({linear.in_features} -> {linear.out_features}) needs {shape}."
                )
