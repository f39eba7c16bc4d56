from .config import MoreConfig
from .layer import Linear, MoreLayer
from .model import MoreModel

__all__ = ["Linear", "MoreConfig", "MoreLayer", "MoreModel"]
