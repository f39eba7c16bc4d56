from ..spec import MethodSpec, register_method
from . import convert  # noqa: F401  (registers the converter of the public EPT code)
from .config import EptConfig
from .layer import EptLayer, Linear

SPEC = register_method(MethodSpec(EptConfig, "ept", "EPT", layer_cls=Linear))
EptModel = SPEC.tuner_cls  # the tuner the spec built (importable by name, e.g. for pickling)

__all__ = ["SPEC", "EptConfig", "EptLayer", "EptModel", "Linear"]
