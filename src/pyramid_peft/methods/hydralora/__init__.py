from .config import HydraLoraConfig
from .layer import HydraLoraLayer, Linear
from .model import HydraLoraModel
from ..spec import MethodSpec, register_method

register_method(MethodSpec(HydraLoraConfig, HydraLoraModel, "hydralora", "HydraLoRA"))

__all__ = ["HydraLoraConfig", "HydraLoraLayer", "HydraLoraModel", "Linear"]
