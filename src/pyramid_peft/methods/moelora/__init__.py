from ..spec import MethodSpec, register_method
from .config import MoeLoraConfig
from .layer import Linear, MoeLoraLayer

SPEC = register_method(MethodSpec(MoeLoraConfig, "moelora", "MOELoRA", layer_cls=Linear))
MoeLoraModel = SPEC.tuner_cls  # the tuner the spec built (importable by name, e.g. for pickling)

__all__ = ["MoeLoraConfig", "MoeLoraLayer", "MoeLoraModel", "Linear", "SPEC"]
