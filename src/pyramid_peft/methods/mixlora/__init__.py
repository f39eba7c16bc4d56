from ..spec import MethodSpec, register_method
from .config import MixLoraConfig
from .layer import ExpertOutput, FeedForward, Linear, MixLoraLayer
from .model import MixLoraModel

SPEC = register_method(MethodSpec(MixLoraConfig, "mixlora", "MixLoRA", tuner_cls=MixLoraModel))

__all__ = ["SPEC", "ExpertOutput", "FeedForward", "Linear", "MixLoraConfig", "MixLoraLayer", "MixLoraModel"]
