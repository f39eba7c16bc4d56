from ..spec import MethodSpec, register_method
from .config import MoeLoraConfig
from .layer import Linear, MoeLoraLayer
from .model import MoeLoraModel

register_method(MethodSpec(MoeLoraConfig, MoeLoraModel, "moelora", "MOELoRA"))

__all__ = ["Linear", "MoeLoraConfig", "MoeLoraLayer", "MoeLoraModel"]
