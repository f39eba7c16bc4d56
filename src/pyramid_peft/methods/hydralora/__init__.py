from ..spec import MethodSpec, register_method
from .config import HydraLoraConfig
from .layer import HydraLoraLayer, Linear

SPEC = register_method(MethodSpec(HydraLoraConfig, "hydralora", "HydraLoRA", layer_cls=Linear))
HydraLoraModel = SPEC.tuner_cls  # the tuner the spec built (importable by name, e.g. for pickling)

__all__ = ["HydraLoraConfig", "HydraLoraLayer", "HydraLoraModel", "Linear", "SPEC"]
