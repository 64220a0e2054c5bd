"""lightning-peft: parameter-efficient fine-tuning (LoRA, rsLoRA, DoRA, ...) for PyTorch Lightning.

The functional core works on any ``torch.nn.Module``: inject adapters, train, save them in the
HF PEFT format, load PEFT's, merge them into the base; QLoRA: freeze the base in 4-bit NF4
(bitsandbytes) first, then export a merged float model. See README.md for a quick start.
"""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names, imported on first use (PEP 562): ``import lightning_peft`` itself is cheap, so that
# ``lightning-peft --help`` and ``inspect`` do not wait for Lightning, transformers or
# bitsandbytes. ``from lightning_peft import X`` and ``lightning_peft.X`` work as usual.
_EXPORTS = {
    ".activation_checkpointing": ("enable_gradient_checkpointing",),
    ".bigmodel": ("empty_init", "load_quantized"),
    ".causal_lm": ("CausalLMModule",),
    ".checkpoint": ("load_adapter", "save_adapter"),
    ".config": ("BitFitConfig", "BottleneckConfig", "IA3Config", "LoraConfig", "PrefixTuningConfig",
                "PromptTuningConfig", "QuantConfig"),
    ".estimate": ("MemoryEstimate", "estimate_memory"),
    ".inject": ("adapter_configs", "delete_adapter", "disable_adapters", "inject_adapters", "set_adapter",
                "use_adapter"),
    ".merge": ("export_merged", "merge_adapters", "merged_state_dict", "unmerge_adapters"),
    ".multi": ("adapter_ids", "clear_adapter_caches", "combine_adapters", "hot_swap_adapter"),
    ".quantize": ("MemoryReport", "memory_report", "quantize_base"),
    ".recipe": ("recipe_optimizer",),
    ".report": ("AdapterReport", "adapter_report"),
    ".fsdp": ("PEFTFSDPStrategy",),
    ".strategy": ("PEFTDDPStrategy", "PEFTStrategy", "register_strategies", "restore_adapters"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .activation_checkpointing import enable_gradient_checkpointing
    from .bigmodel import empty_init, load_quantized
    from .causal_lm import CausalLMModule
    from .checkpoint import load_adapter, save_adapter
    from .config import (BitFitConfig, BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                         PromptTuningConfig, QuantConfig)
    from .estimate import MemoryEstimate, estimate_memory
    from .fsdp import PEFTFSDPStrategy
    from .inject import adapter_configs, delete_adapter, disable_adapters, inject_adapters, set_adapter, use_adapter
    from .merge import export_merged, merge_adapters, merged_state_dict, unmerge_adapters
    from .multi import adapter_ids, clear_adapter_caches, combine_adapters, hot_swap_adapter
    from .quantize import MemoryReport, memory_report, quantize_base
    from .recipe import recipe_optimizer
    from .report import AdapterReport, adapter_report
    from .strategy import PEFTDDPStrategy, PEFTStrategy, register_strategies, restore_adapters


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


# The strategy names ("lora", "qlora", ...) are registered with Lightning on ``import
# lightning_peft`` without importing Lightning: once ``lightning.pytorch`` is loaded (now, or later:
# a one-shot import hook), its ``StrategyRegistry`` registers them on its first lookup (a Trainer
# resolving ``strategy="qlora"``, ``"qlora" in StrategyRegistry``), when every import is complete.
def _register_on_first_lookup() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    original = type(StrategyRegistry)
    if getattr(original, "_lightning_peft_pending", False):
        return

    def ensure(registry) -> None:
        if type(registry) is pending:
            registry.__class__ = original  # first: the registration below looks names up too
            from .strategy import register_strategies

            register_strategies()

    def first_lookup(name: str):
        def method(self, *args, **kwargs):
            ensure(self)
            return getattr(original, name)(self, *args, **kwargs)

        method.__name__ = name
        return method

    lookups = ("get", "available_strategies", "__contains__", "__getitem__", "__iter__", "__len__", "keys",
               "items", "values")
    pending = type("_PendingStrategyRegistry", (original,),
                   {"_lightning_peft_pending": True, **{name: first_lookup(name) for name in lookups}})
    StrategyRegistry.__class__ = pending


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``lightning.pytorch`` is about to be loaded, it removes itself,
    lets the other finders find the module, and makes its loader call
    :func:`_register_on_first_lookup` once the module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "lightning.pytorch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module) -> None:
            exec_module(module)
            _register_on_first_lookup()

        spec.loader.exec_module = exec_and_register
        return spec


if "lightning.pytorch" in sys.modules:
    _register_on_first_lookup()
elif not any(isinstance(finder, _RegisterAfterLightning) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterLightning())

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
