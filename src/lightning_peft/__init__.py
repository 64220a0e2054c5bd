"""lightning-peft: parameter-efficient fine-tuning (LoRA, rsLoRA, DoRA, ...) for PyTorch Lightning.

The functional core works on any ``torch.nn.Module``: inject adapters, train, save them in the
HF PEFT format, load PEFT's, merge them into the base. See README.md for a quick start.
"""

from .checkpoint import load_adapter, save_adapter
from .config import LoraConfig
from .inject import adapter_configs, delete_adapter, disable_adapters, inject_adapters, set_adapter
from .merge import merge_adapters, unmerge_adapters
from .report import AdapterReport, adapter_report

__version__ = "0.1.0"

__all__ = [
    "AdapterReport",
    "LoraConfig",
    "adapter_configs",
    "adapter_report",
    "delete_adapter",
    "disable_adapters",
    "inject_adapters",
    "load_adapter",
    "merge_adapters",
    "save_adapter",
    "set_adapter",
    "unmerge_adapters",
]
