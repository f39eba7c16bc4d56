from ..spec import MethodSpec, register_method
from .config import TuckaConfig
from .layer import Linear, TuckaLayer, TuckaRoutingError
from .model import TuckaModel, fixed_route

register_method(MethodSpec(TuckaConfig, TuckaModel, "tucka", "TuckA"))

__all__ = ["Linear", "TuckaConfig", "TuckaLayer", "TuckaModel", "TuckaRoutingError", "fixed_route"]
