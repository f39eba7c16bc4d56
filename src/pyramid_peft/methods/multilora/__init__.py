from .config import MultiLoraConfig
from .layer import Linear, MultiLoraLayer
from .model import MultiLoraModel

__all__ = ["Linear", "MultiLoraConfig", "MultiLoraLayer", "MultiLoraModel"]
