from .config import TuckaConfig
from .layer import Linear, TuckaLayer, TuckaRoutingError
from .model import TuckaModel, fixed_route

__all__ = ["Linear", "TuckaConfig", "TuckaLayer", "TuckaModel", "TuckaRoutingError", "fixed_route"]
