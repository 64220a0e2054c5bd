"""Adapter methods: each wraps a module of the user's model (composition, never subclassing),
except prompt and prefix tuning, which hang one module off the model itself."""

from .base import AdapterModule
from .bitfit import BitFitLayer
from .bottleneck import BottleneckLayer
from .ia3 import IA3Layer
from .ia3_conv import IA3ConvLayer
from .lora import LoraLayer
from .lora_param import LoraParamLayer
from .lora_conv import LoraConvLayer
from .lora_mha import LoraMHALayer
from .modules_to_save import ModulesToSave
from .prompt import PromptLearning
from .trainable_tokens import TrainableTokensLayer

__all__ = ["AdapterModule", "BitFitLayer", "BottleneckLayer", "IA3ConvLayer", "IA3Layer", "LoraConvLayer", "LoraLayer",
           "LoraMHALayer", "LoraParamLayer", "ModulesToSave", "PromptLearning", "TrainableTokensLayer"]
