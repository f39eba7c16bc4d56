"""Quantized bases: the ``model.quantization`` section, loading through bitsandbytes, and dequantizing for a merge.

A base model loads in 4 or 8 bits through transformers' ``BitsAndBytesConfig`` (QLoRA, arXiv:2305.14314: NF4 or
FP4 blocks of 64 weights, optionally with their scales quantized again; LLM.int8(), arXiv:2208.07339, for 8
bits), then goes through PEFT's ``prepare_model_for_kbit_training``: every base weight frozen, the weights that
stay in 16 bits cast to float32. The adapters train in float32 on top of the frozen quantized linears, which
compute in ``compute_dtype`` (4-bit) or in int8 with float16 outliers (8-bit).

See https://huggingface.co/docs/transformers/quantization/bitsandbytes and
https://huggingface.co/docs/peft/developer_guides/quantization.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

import torch
from torch import nn

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
INSTALL_HINT = "pip install 'pyramid-peft[quantization]' (bitsandbytes)"


@dataclass(frozen=True)
class Quantization:
    """The ``model.quantization`` section.

    Args:
        bits: 4 (QLoRA's NF4/FP4) or 8 (LLM.int8()).
        quant_type: 4-bit data type, ``nf4`` (normal float, the QLoRA default) or ``fp4``.
        double_quant: quantize the 4-bit blocks' scales as well (QLoRA's double quantization, ~0.4 bit per weight
            saved).
        compute_dtype: dtype of the 4-bit matmuls and of a merged (dequantized) model; empty means ``model.dtype``
            where that is one of ``float32``, ``bfloat16``, ``float16``, else ``float32``.
        skip_modules: module names kept in full precision (the output head always is).
        int8_threshold: LLM.int8()'s outlier threshold: activations above it are multiplied in float16.
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    skip_modules: list[str] = field(default_factory=list)
    int8_threshold: float = 6.0

    def problems(self, prefix: str = "model.quantization.") -> list[str]:
        """Values out of range, and settings that the chosen ``bits`` would ignore; empty when usable."""
        found = []
        if self.bits not in BITS:
            found.append(f"{prefix}bits={self.bits!r} must be 4 or 8.")
        if self.quant_type not in QUANT_TYPES:
            found.append(f"{prefix}quant_type={self.quant_type!r} must be one of {', '.join(QUANT_TYPES)}.")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            found.append(f"{prefix}compute_dtype={self.compute_dtype!r} must be one of {', '.join(COMPUTE_DTYPES)}.")
        if self.int8_threshold < 0:
            found.append(f"{prefix}int8_threshold={self.int8_threshold!r} must not be negative.")
        defaults = Quantization()
        if self.bits == 8:
            for name in ("quant_type", "double_quant", "compute_dtype"):
                if getattr(self, name) != getattr(defaults, name):
                    found.append(f"{prefix}{name} applies to 4-bit bases only: remove it, or set bits: 4.")
        if self.bits == 4 and self.int8_threshold != defaults.int8_threshold:
            found.append(f"{prefix}int8_threshold applies to 8-bit bases only: remove it, or set bits: 8.")
        if importlib.util.find_spec("bitsandbytes") is None:
            found.append(f"model.quantization needs bitsandbytes, which is not installed: {INSTALL_HINT}.")
        return found

    def torch_compute_dtype(self, model_dtype: str | torch.dtype | None) -> torch.dtype:
        """``compute_dtype``, or the model's dtype where it is a 16/32-bit float, or float32."""
        if self.compute_dtype is not None:
            return getattr(torch, self.compute_dtype)
        if isinstance(model_dtype, str):
            model_dtype = getattr(torch, model_dtype, None)
        return model_dtype if model_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32

    def bnb_config(self, model_dtype: str | torch.dtype | None = None):
        """The transformers ``BitsAndBytesConfig`` of this section."""
        from transformers import BitsAndBytesConfig

        skip = list(self.skip_modules) or None
        if self.bits == 8:
            return BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=self.int8_threshold, llm_int8_skip_modules=skip
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.torch_compute_dtype(model_dtype),
            llm_int8_skip_modules=skip,
        )


def quantization_keys() -> list[str]:
    """The keys ``model.quantization`` accepts."""
    return [f.name for f in dataclasses.fields(Quantization)]


def as_quantization(section: dict | Quantization | None) -> Quantization | None:
    """The section as a :class:`Quantization` (None for an unquantized base); checked by ``ept train``'s config
    validation before this is reached."""
    if section is None or isinstance(section, Quantization):
        return section
    return Quantization(**section)


def prepare_for_training(model: nn.Module) -> nn.Module:
    """PEFT's k-bit preparation, leaving gradient checkpointing to ``training.gradient_checkpointing``.

    The inputs of the first layer are made to require grad so that checkpointing (when it is asked for) has a
    graph to re-enter; PEFT does this only when it also turns checkpointing on itself.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` was loaded through a transformers quantizer (bitsandbytes here)."""
    return getattr(model, "hf_quantizer", None) is not None


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a quantized ``model`` computes in: 4-bit layers' ``compute_dtype``, else the model's dtype."""
    config = getattr(model.config, "quantization_config", None)
    dtype = getattr(config, "bnb_4bit_compute_dtype", None) if getattr(config, "load_in_4bit", False) else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or Quantization().torch_compute_dtype(getattr(model.config, "dtype", None))


@torch.no_grad()
def dequantized(model: nn.Module) -> nn.Module:
    """``model`` with every quantized linear replaced, in place, by a plain ``nn.Linear`` holding its dequantized
    weight, the whole model cast to the compute dtype (:func:`compute_dtype`) and its quantization config removed:
    a model that saves and loads anywhere. An unquantized model is returned as it is.

    The dequantized weight is bitsandbytes' own dequantization (``dequantize_4bit``, or the int8 weights times their
    row scales), the weight the quantized layers multiply by when they train. Adding a weight change to it
    therefore reproduces an adapter on the quantized base to float rounding, against the base computing that way.
    bitsandbytes' inference kernels round on their own: LLM.int8() quantizes the activations to int8, and on CPUs
    with AVX512-BF16 the 4-bit kernel multiplies in bfloat16 (under 1% of the logits' range on the tiny models of
    ``tests/test_quantized.py``).
    """
    if not is_quantized(model):
        return model
    dtype = compute_dtype(model)
    model.dequantize(dtype=dtype)  # transformers' bitsandbytes integration: replaces the layers, drops the config
    model.to(dtype)
    model.config.dtype = dtype
    return model
