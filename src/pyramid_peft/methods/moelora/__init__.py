from ..spec import MethodSpec, register_method
from .config import MoeLoraConfig
from .layer import Linear, MoeLoraLayer

SPEC = register_method(MethodSpec(MoeLoraConfig, "moelora", "MOELoRA", layer_cls=Linear))

__all__ = ["MoeLoraConfig", "MoeLoraLayer", "Linear", "SPEC"]
