"""Import adapters trained with the public EPT code or the public TuckA code into pyramid-peft adapter folders.

SRC is what the public code's ``save_pretrained`` writes: ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``, read with ``weights_only=True``). Its keys are ``base_model.model.<module>.<tensor>``:

=========================================  ==========================================  ===========================
public EPT code (``--from ept-code``)       shape                                       pyramid-peft (``EptConfig``)
=========================================  ==========================================  ===========================
``lora_A.weight``                           (r, floor(d_in / k_min))                    ``ept_A``
``lora_B.weight``                           (floor(d_out / k_min), r)                   ``ept_B``
``lora_expert_kernels.<e>``                 (1, floor(d_out / k_e), k_e, 1)             ``ept_kernels`` (flattened,
                                                                                        expert order)
``lora_gate.0.weight`` / ``.bias``          (E, d_in) / (E,)                            ``ept_gate.weight`` / ``.bias``
``lora_task_embedding.weight``              (rows, d_in)                                ``ept_task_embedding``
public TuckA code (``--from tucka-code``)
``tucka_g`` / ``tucka_c`` / ``tucka_u``     (k, p, r, r) / (t, p) / (d_in, r)           ``tucka_core`` / ``_mode`` /
                                                                                        ``_factor``
``tucka_ec`` (router module only)           (k * t, d_in)                               ``tucka_centroids`` (+ ready)
=========================================  ==========================================  ===========================

The EPT adapter becomes ``EptConfig.reference_code`` (code1d experts, the double-softmax gate) with the kernel sizes
read from the kernel shapes and ``top_k=2`` (what the public ``finetune.py`` sets); the TuckA adapter a
``TuckaConfig`` whose sizes come from the tensor shapes, routed from the module that holds the centroids. Converted
centroids are marked initialised, so the first forward keeps them (the public code's reload re-initialises them).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_directory
from .methods.ept import EptConfig
from .methods.tucka import TuckaConfig

SOURCES = ("ept-code", "tucka-code")
PREFIX = "base_model.model."
EPT_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_gate.0.weight", "lora_gate.0.bias", "lora_task_embedding.weight")
TUCKA_TENSORS = {"tucka_g": "tucka_core", "tucka_c": "tucka_mode", "tucka_u": "tucka_factor"}


class ConversionError(ValueError):
    """The source folder is not a checkpoint of the public code, or does not fit the base model."""


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
    if source not in SOURCES:
        raise ConversionError(f"source={source!r} is not one of {list(SOURCES)}.")
    src = Path(src)
    settings, tensors = read_checkpoint(src)
    modules = split_by_module(tensors, src)
    if source == "ept-code":
        config, state = _convert_ept(modules, settings, src, top_k, num_tasks, gate)
    else:
        config, state = _convert_tucka(modules, settings, src, num_tasks)
    if base_model is not None:
        check_against_base(config, modules, base_model, src)
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


def split_by_module(tensors: dict[str, torch.Tensor], src: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {tensor name: tensor}}`` from keys ``base_model.model.<module>.<tensor>``."""
    pattern = re.compile(
        r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora_expert_kernels\.\d+|lora_gate\.0\.(?:weight|bias)"
        r"|lora_task_embedding\.weight|tucka_(?:g|c|u|ec))$"
    )
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        match = pattern.match(key[len(PREFIX) :]) if key.startswith(PREFIX) else None
        if match is None:
            raise ConversionError(
                f"key {key!r} in {src} is not a tensor of the public EPT or TuckA layer (expected "
                f"'{PREFIX}<module>.lora_A.weight', '...lora_expert_kernels.<e>', '...tucka_g', ...)."
            )
        modules[match.group(1)][match.group(2)] = value
    if not modules:
        raise ConversionError(f"{src} holds no tensors.")
    return dict(modules)


# -- EPT -------------------------------------------------------------------------------------------------------------
def _convert_ept(modules, settings, src, top_k, num_tasks, gate):
    kernel_sizes, state = None, {}
    r = int(settings.get("r", next(iter(modules.values())).get("lora_A.weight", torch.empty(0)).shape[0]))
    for name, parts in modules.items():
        sizes = _ept_kernel_sizes(name, parts, src)
        if kernel_sizes is not None and sizes != kernel_sizes:
            raise ConversionError(
                f"module {name!r} has kernel sizes {sizes}, others {kernel_sizes}: one adapter has one pyramid."
            )
        kernel_sizes = sizes
        rows = _check_ept_shapes(name, parts, sizes, r, src)
        num_tasks = num_tasks or rows
        if num_tasks > rows:
            raise ConversionError(f"num_tasks={num_tasks} exceeds the {rows} rows of {name!r}'s task table in {src}.")
        state.update(_ept_state(name, parts, len(sizes), num_tasks))
    config = EptConfig.reference_code(
        target_modules=_exact(modules),
        num_tasks=num_tasks,
        r=r,
        lora_alpha=settings.get("lora_alpha", 8),
        lora_dropout=settings.get("lora_dropout", 0.0),
        kernel_sizes=kernel_sizes,
        top_k=top_k or min(2, len(kernel_sizes)),
        gate_form=gate or "code",
        base_model_name_or_path=settings.get("base_model_name_or_path"),
        task_type=settings.get("task_type"),
    )
    return config, state


def _ept_kernel_sizes(name: str, parts: dict, src: Path) -> list[int]:
    missing = [t for t in EPT_TENSORS if t not in parts]
    kernels = sorted((int(t.rsplit(".", 1)[1]), v) for t, v in parts.items() if t.startswith("lora_expert_kernels."))
    if missing or not kernels:
        what = missing or ["lora_expert_kernels.<e>"]
        raise ConversionError(
            f"module {name!r} in {src} lacks {what}: not a checkpoint of the public EPT code "
            "(use --from tucka-code for TuckA)."
        )
    if [e for e, _ in kernels] != list(range(len(kernels))):
        raise ConversionError(f"module {name!r}: expert kernels {[e for e, _ in kernels]} are not numbered 0..E-1.")
    for e, kernel in kernels:
        if kernel.dim() != 4 or kernel.shape[0] != 1 or kernel.shape[3] != 1:
            raise ConversionError(
                f"key '{PREFIX}{name}.lora_expert_kernels.{e}' has shape {tuple(kernel.shape)}; "
                "expected (1, floor(d_out/k), k, 1)."
            )
    return [kernel.shape[2] for _, kernel in kernels]


def _check_ept_shapes(name: str, parts: dict, sizes: list[int], r: int, src: Path) -> int:
    """Check that the module's tensors fit one layer; returns the rows of its task table."""
    gate_w, table = parts["lora_gate.0.weight"], parts["lora_task_embedding.weight"]
    d_in = gate_w.shape[1]
    k_min = min(sizes)
    m_min = parts["lora_expert_kernels." + str(sizes.index(k_min))].shape[1]
    expected = {
        "lora_A.weight": (r, d_in // k_min),
        "lora_B.weight": (m_min, r),
        "lora_gate.0.weight": (len(sizes), d_in),
        "lora_gate.0.bias": (len(sizes),),
        "lora_task_embedding.weight": (table.shape[0], d_in),
    }
    for tensor, shape in expected.items():
        if tuple(parts[tensor].shape) != shape:
            raise ConversionError(
                f"key '{PREFIX}{name}.{tensor}' of module {name!r} has shape "
                f"{tuple(parts[tensor].shape)}, expected {shape} (r={r}, kernels {sizes})."
            )
    return table.shape[0]


def _ept_state(name: str, parts: dict, experts: int, num_tasks: int) -> dict[str, torch.Tensor]:
    kernels = [parts[f"lora_expert_kernels.{e}"][0, :, :, 0].reshape(-1) for e in range(experts)]
    key = PREFIX + name
    return {
        f"{key}.ept_A": parts["lora_A.weight"],
        f"{key}.ept_B": parts["lora_B.weight"],
        f"{key}.ept_kernels": torch.cat(kernels),
        f"{key}.ept_gate.weight": parts["lora_gate.0.weight"],
        f"{key}.ept_gate.bias": parts["lora_gate.0.bias"],
        f"{key}.ept_task_embedding": parts["lora_task_embedding.weight"][:num_tasks],
    }


# -- TuckA -----------------------------------------------------------------------------------------------------------
def _convert_tucka(modules, settings, src, num_tasks):
    state, sizes = {}, None
    for name, parts in modules.items():
        shape = _check_tucka_shapes(name, parts, src)
        if sizes is not None and shape[:4] != sizes[:4]:
            raise ConversionError(f"module {name!r} has (k, p, r, t) = {shape[:4]}, others {sizes[:4]}.")
        sizes = shape
        state.update({f"{PREFIX}{name}.{TUCKA_TENSORS[t]}": parts[t] for t in TUCKA_TENSORS})
    k, p, r, t, _ = sizes
    routers = [name for name, parts in modules.items() if "tucka_ec" in parts]
    if len(routers) != 1:
        raise ConversionError(
            f"{src} has centroids (tucka_ec) on {routers or 'no module'}: a TuckA checkpoint has "
            "them on exactly one module, the router."
        )
    router = routers[0]
    centroids = modules[router]["tucka_ec"]
    if tuple(centroids.shape) != (k * t, modules[router]["tucka_u"].shape[0]):
        raise ConversionError(
            f"key '{PREFIX}{router}.tucka_ec' of module {router!r} has shape {tuple(centroids.shape)}, expected "
            f"({k * t}, d_in)."
        )
    state[f"{PREFIX}{router}.tucka_centroids"] = centroids
    state[f"{PREFIX}{router}.tucka_centroids_ready"] = torch.tensor(True)  # trained centroids: never re-initialise
    config = TuckaConfig(
        target_modules=_exact(modules),
        num_tasks=num_tasks or 8,
        r=r,
        k=k,
        t=t,
        p=p,
        alpha=settings.get("alpha", 1.0),
        ec_perturb_scale=settings.get("ec_perturb_scale", 1.0),
        router_module=router,
        base_model_name_or_path=settings.get("base_model_name_or_path"),
        task_type=settings.get("task_type"),
    )
    return config, state


def _check_tucka_shapes(name: str, parts: dict, src: Path) -> tuple[int, int, int, int, int]:
    missing = [t for t in TUCKA_TENSORS if t not in parts]
    if missing:
        raise ConversionError(
            f"module {name!r} in {src} lacks {missing}: not a checkpoint of the public TuckA code "
            "(use --from ept-code for EPT)."
        )
    core, mode, factor = parts["tucka_g"], parts["tucka_c"], parts["tucka_u"]
    if core.dim() != 4 or core.shape[2] != core.shape[3]:
        raise ConversionError(f"key '{PREFIX}{name}.tucka_g' has shape {tuple(core.shape)}; expected (k, p, r, r).")
    k, p, r = core.shape[0], core.shape[1], core.shape[2]
    if mode.dim() != 2 or mode.shape[1] != p:
        raise ConversionError(f"key '{PREFIX}{name}.tucka_c' has shape {tuple(mode.shape)}; expected (t, {p}).")
    if factor.dim() != 2 or factor.shape[1] != r:
        raise ConversionError(f"key '{PREFIX}{name}.tucka_u' has shape {tuple(factor.shape)}; expected (d_in, {r}).")
    return k, p, r, mode.shape[0], factor.shape[0]


# -- checks against the base model -----------------------------------------------------------------------------------
def check_against_base(config, modules: dict[str, dict[str, torch.Tensor]], base_model: nn.Module, src: Path) -> None:
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
        for tensor, shape in _expected_shapes(config, linear).items():
            if tensor in parts and tuple(parts[tensor].shape) != shape:
                raise ConversionError(
                    f"key '{PREFIX}{name}.{tensor}' has shape {tuple(parts[tensor].shape)}, but module {name!r} of the "
                    f"base model ({linear.in_features} -> {linear.out_features}) needs {shape}."
                )


def _expected_shapes(config, linear: nn.Linear) -> dict[str, tuple[int, ...]]:
    d_in, d_out = linear.in_features, linear.out_features
    if isinstance(config, TuckaConfig):
        return {"tucka_u": (d_in, config.r), "tucka_ec": (config.k * config.t, d_in)}
    k_min = min(config.kernel_sizes)
    shapes = {
        "lora_A.weight": (config.r, d_in // k_min),
        "lora_B.weight": (d_out // k_min, config.r),
        "lora_gate.0.weight": (len(config.kernel_sizes), d_in),
    }
    for e, k in enumerate(config.kernel_sizes):
        shapes[f"lora_expert_kernels.{e}"] = (1, d_out // k, k, 1)
    return shapes


def _exact(modules: dict) -> str:
    """A target_modules regex that matches exactly the converted modules."""
    return "^(" + "|".join(re.escape(name) for name in sorted(modules)) + ")$"
