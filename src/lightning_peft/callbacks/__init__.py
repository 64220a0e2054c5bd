"""Lightning callbacks; each works alone, with a lightning-peft strategy or with adapters injected
by ``lightning_peft.inject_adapters``."""

from .adapter_checkpoint import AdapterCheckpoint
from .merge_adapters import MergeAdapters
from .paged_optimizer import PagedOptimizer

__all__ = ["AdapterCheckpoint", "MergeAdapters", "PagedOptimizer"]
