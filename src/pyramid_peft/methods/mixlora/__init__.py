from ..spec import MethodSpec, register_method
from .config import MixLoraConfig
from .layer import ExpertOutput, FeedForward, Linear, MixLoraLayer
from .model import MixLoraModel

register_method(MethodSpec(MixLoraConfig, MixLoraModel, "mixlora", "MixLoRA"))

__all__ = ["ExpertOutput", "FeedForward", "Linear", "MixLoraConfig", "MixLoraLayer", "MixLoraModel"]
