"""Import an adapter trained with the public EPT code (``ept convert --from ept-code``).

=========================================  ==========================================  ===========================
public EPT code                             shape                                       pyramid-peft (``EptConfig``)
=========================================  ==========================================  ===========================
``lora_A.weight``                           (r, floor(d_in / k_min))                    ``ept_A``
``lora_B.weight``                           (floor(d_out / k_min), r)                   ``ept_B``
``lora_expert_kernels.<e>``                 (1, floor(d_out / k_e), k_e, 1)             ``ept_kernels`` (flattened,
                                                                                        expert order)
``lora_gate.0.weight`` / ``.bias``          (E, d_in) / (E,)                            ``ept_gate.weight`` / ``.bias``
``lora_task_embedding.weight``              (rows, d_in)                                ``ept_task_embedding``
=========================================  ==========================================  ===========================

The adapter becomes ``EptConfig.reference_code`` (code1d experts, the double-softmax gate) with the kernel sizes
read from the kernel shapes and ``top_k=2`` (what the public ``finetune.py`` sets).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..spec import PREFIX, ConversionError, Converter, exact_targets, register_converter
from .config import EptConfig

EPT_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_gate.0.weight", "lora_gate.0.bias", "lora_task_embedding.weight")


def convert_ept(modules, settings, src, top_k=None, num_tasks=None, gate=None):
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
        target_modules=exact_targets(modules),
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


def expected_ept_shapes(config: EptConfig, linear: nn.Linear) -> dict[str, tuple[int, ...]]:
    d_in, d_out = linear.in_features, linear.out_features
    k_min = min(config.kernel_sizes)
    shapes = {
        "lora_A.weight": (config.r, d_in // k_min),
        "lora_B.weight": (d_out // k_min, config.r),
        "lora_gate.0.weight": (len(config.kernel_sizes), d_in),
    }
    for e, k in enumerate(config.kernel_sizes):
        shapes[f"lora_expert_kernels.{e}"] = (1, d_out // k, k, 1)
    return shapes


register_converter(
    Converter(
        source="ept-code",
        description="the public EPT layer",
        tensor_names=r"lora_A\.weight|lora_B\.weight|lora_expert_kernels\.\d+|lora_gate\.0\.(?:weight|bias)"
        r"|lora_task_embedding\.weight",
        convert=convert_ept,
        expected_shapes=expected_ept_shapes,
        options=("top_k", "num_tasks", "gate"),
    )
)
