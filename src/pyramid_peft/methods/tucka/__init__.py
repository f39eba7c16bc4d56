from ..spec import MethodSpec, register_method
from . import convert  # noqa: F401  (registers the converter of the public TuckA code)
from .config import TuckaConfig
from .layer import Linear, TuckaLayer, TuckaRoutingError
from .model import TuckaModel, fixed_route, merge_tucka_route

SPEC = register_method(MethodSpec(TuckaConfig, "tucka", "TuckA", tuner_cls=TuckaModel))

__all__ = [
    "SPEC",
    "Linear",
    "TuckaConfig",
    "TuckaLayer",
    "TuckaModel",
    "TuckaRoutingError",
    "fixed_route",
    "merge_tucka_route",
]
