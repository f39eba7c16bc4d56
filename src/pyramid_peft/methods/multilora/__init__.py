from ..spec import MethodSpec, register_method
from .config import MultiLoraConfig
from .layer import Linear, MultiLoraLayer
from .model import MultiLoraModel

register_method(MethodSpec(MultiLoraConfig, MultiLoraModel, "multilora", "MultiLoRA"))

__all__ = ["Linear", "MultiLoraConfig", "MultiLoraLayer", "MultiLoraModel"]
