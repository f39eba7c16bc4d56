from ..spec import MethodSpec, register_method
from .config import MoreConfig
from .layer import Linear, MoreLayer
from .model import MoreModel

register_method(MethodSpec(MoreConfig, MoreModel, "more", "MoRE"))

__all__ = ["Linear", "MoreConfig", "MoreLayer", "MoreModel"]
