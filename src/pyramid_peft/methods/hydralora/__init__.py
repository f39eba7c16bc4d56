from .config import HydraLoraConfig
from .layer import HydraLoraLayer, Linear
from .model import HydraLoraModel

__all__ = ["HydraLoraConfig", "HydraLoraLayer", "HydraLoraModel", "Linear"]
