from ..spec import MethodSpec, register_method
from .config import HydraLoraConfig
from .layer import HydraLoraLayer, Linear

SPEC = register_method(MethodSpec(HydraLoraConfig, "hydralora", "HydraLoRA", layer_cls=Linear))

__all__ = ["HydraLoraConfig", "HydraLoraLayer", "Linear", "SPEC"]
