from .config import MoeLoraConfig
from .layer import Linear, MoeLoraLayer
from .model import MoeLoraModel

__all__ = ["Linear", "MoeLoraConfig", "MoeLoraLayer", "MoeLoraModel"]
