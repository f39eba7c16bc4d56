from ..spec import MethodSpec, register_method
from .config import MultiLoraConfig
from .layer import Linear, MultiLoraLayer

SPEC = register_method(MethodSpec(MultiLoraConfig, "multilora", "MultiLoRA", layer_cls=Linear))

__all__ = ["MultiLoraConfig", "MultiLoraLayer", "Linear", "SPEC"]
