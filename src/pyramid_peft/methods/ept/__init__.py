from .config import EptConfig
from .layer import EptLayer, Linear
from .model import EptModel

__all__ = ["EptConfig", "EptLayer", "EptModel", "Linear"]
