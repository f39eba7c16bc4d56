from .config import MixLoraConfig
from .layer import ExpertOutput, FeedForward, Linear, MixLoraLayer
from .model import MixLoraModel

__all__ = ["ExpertOutput", "FeedForward", "Linear", "MixLoraConfig", "MixLoraLayer", "MixLoraModel"]
