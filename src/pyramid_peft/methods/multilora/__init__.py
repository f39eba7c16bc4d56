from ..spec import MethodSpec, register_method
from .config import MultiLoraConfig
from .layer import Linear, MultiLoraLayer

SPEC = register_method(MethodSpec(MultiLoraConfig, "multilora", "MultiLoRA", layer_cls=Linear))
MultiLoraModel = SPEC.tuner_cls  # the tuner the spec built (importable by name, e.g. for pickling)

__all__ = ["MultiLoraConfig", "MultiLoraLayer", "MultiLoraModel", "Linear", "SPEC"]
