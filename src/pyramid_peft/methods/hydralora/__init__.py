from ..spec import MethodSpec, register_method
from .config import HydraLoraConfig
from .layer import HydraLoraLayer, Linear
from .model import HydraLoraModel

register_method(MethodSpec(HydraLoraConfig, HydraLoraModel, "hydralora", "HydraLoRA"))

__all__ = ["HydraLoraConfig", "HydraLoraLayer", "HydraLoraModel", "Linear"]
