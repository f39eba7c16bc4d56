from ..spec import MethodSpec, register_method
from .config import MoreConfig
from .layer import Linear, MoreLayer

SPEC = register_method(MethodSpec(MoreConfig, "more", "MoRE", layer_cls=Linear))

__all__ = ["MoreConfig", "MoreLayer", "Linear", "SPEC"]
