from .config import MoreConfig
from .layer import Linear, MoreLayer
from .model import MoreModel
from ..spec import MethodSpec, register_method

register_method(MethodSpec(MoreConfig, MoreModel, "more", "MoRE"))

__all__ = ["Linear", "MoreConfig", "MoreLayer", "MoreModel"]
