from .config import MultiLoraConfig
from .layer import Linear, MultiLoraLayer
from .model import MultiLoraModel
from ..spec import MethodSpec, register_method

register_method(MethodSpec(MultiLoraConfig, MultiLoraModel, "multilora", "MultiLoRA"))

__all__ = ["Linear", "MultiLoraConfig", "MultiLoraLayer", "MultiLoraModel"]
