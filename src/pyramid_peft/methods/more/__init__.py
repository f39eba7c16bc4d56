from ..spec import MethodSpec, register_method
from .config import MoreConfig
from .layer import Linear, MoreLayer

SPEC = register_method(MethodSpec(MoreConfig, "more", "MoRE", layer_cls=Linear))
MoreModel = SPEC.tuner_cls  # the tuner the spec built (importable by name, e.g. for pickling)

__all__ = ["MoreConfig", "MoreLayer", "MoreModel", "Linear", "SPEC"]
