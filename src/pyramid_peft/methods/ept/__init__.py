from ..spec import MethodSpec, register_method
from .config import EptConfig
from .layer import EptLayer, Linear
from .model import EptModel

register_method(MethodSpec(EptConfig, EptModel, "ept", "EPT"))

__all__ = ["EptConfig", "EptLayer", "EptModel", "Linear"]
