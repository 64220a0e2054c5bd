"""lightning-peft: parameter-efficient fine-tuning (LoRA, rsLoRA, DoRA, ...) for PyTorch Lightning.

The functional core works on any ``torch.nn.Module``: inject adapters, train, save them in the
HF PEFT format, load PEFT's, merge them into the base; QLoRA: freeze the base in 4-bit NF4
(bitsandbytes) first, then export a merged float model. See README.md for a quick start.
"""

from .activation_checkpointing import enable_gradient_checkpointing
from .bigmodel import empty_init, load_quantized
from .causal_lm import CausalLMModule
from .checkpoint import load_adapter, save_adapter
from .config import (BitFitConfig, BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                     QuantConfig)
from .estimate import MemoryEstimate, estimate_memory
from .inject import adapter_configs, delete_adapter, disable_adapters, inject_adapters, set_adapter, use_adapter
from .merge import export_merged, merge_adapters, merged_state_dict, unmerge_adapters
from .multi import adapter_ids, clear_adapter_caches, combine_adapters, hot_swap_adapter
from .quantize import MemoryReport, memory_report, quantize_base
from .recipe import recipe_optimizer
from .report import AdapterReport, adapter_report
from .fsdp import PEFTFSDPStrategy
from .strategy import PEFTDDPStrategy, PEFTStrategy, register_strategies, restore_adapters

register_strategies()

__version__ = "0.1.0"

__all__ = [
    "AdapterReport",
    "BitFitConfig",
    "BottleneckConfig",
    "CausalLMModule",
    "IA3Config",
    "LoraConfig",
    "MemoryEstimate",
    "MemoryReport",
    "PEFTDDPStrategy",
    "PEFTFSDPStrategy",
    "PEFTStrategy",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QuantConfig",
    "adapter_configs",
    "adapter_ids",
    "adapter_report",
    "clear_adapter_caches",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "empty_init",
    "enable_gradient_checkpointing",
    "estimate_memory",
    "export_merged",
    "hot_swap_adapter",
    "inject_adapters",
    "load_adapter",
    "load_quantized",
    "memory_report",
    "merge_adapters",
    "merged_state_dict",
    "quantize_base",
    "recipe_optimizer",
    "restore_adapters",
    "save_adapter",
    "set_adapter",
    "unmerge_adapters",
    "use_adapter",
]
