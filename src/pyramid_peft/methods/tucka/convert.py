"""Import an adapter trained with the public TuckA code (``ept convert --from tucka-code``).

=========================================  ==========================================  ===========================
public TuckA code                           shape                                       pyramid-peft
=========================================  ==========================================  ===========================
``tucka_g`` / ``tucka_c`` / ``tucka_u``     (k, p, r, r) / (t, p) / (d_in, r)           ``tucka_core`` / ``_mode`` /
                                                                                        ``_factor``
``tucka_ec`` (router module only)           (k * t, d_in)                               ``tucka_centroids`` (+ ready)
=========================================  ==========================================  ===========================

The adapter becomes a ``TuckaConfig`` whose sizes come from the tensor shapes, routed from the module that holds
the centroids. Converted centroids are marked initialised, so the first forward keeps them (the public code's reload
re-initialises them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..spec import PREFIX, ConversionError, Converter, exact_targets, register_converter
from .config import TuckaConfig

TUCKA_TENSORS = {"tucka_g": "tucka_core", "tucka_c": "tucka_mode", "tucka_u": "tucka_factor"}


def convert_tucka(modules, settings, src, num_tasks=None):
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
        target_modules=exact_targets(modules),
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


def expected_tucka_shapes(config: TuckaConfig, linear: nn.Linear) -> dict[str, tuple[int, ...]]:
    return {"tucka_u": (linear.in_features, config.r), "tucka_ec": (config.k * config.t, linear.in_features)}


register_converter(
    Converter(
        source="tucka-code",
        description="the public TuckA layer",
        tensor_names=r"tucka_(?:g|c|u|ec)",
        convert=convert_tucka,
        expected_shapes=expected_tucka_shapes,
        options=("num_tasks",),
    )
)
