"""Lightning callbacks; each works alone, with a lightning-peft strategy or with adapters injected
by ``lightning_peft.inject_adapters``."""

from .adapter_checkpoint import AdapterCheckpoint
from .forgetting_probe import ForgettingProbe
from .merge_adapters import MergeAdapters
from .paged_optimizer import PagedOptimizer
from .rank_monitor import RankMonitor
from .review_samples import ReviewSamples

__all__ = ["AdapterCheckpoint", "ForgettingProbe", "MergeAdapters", "PagedOptimizer", "RankMonitor",
           "ReviewSamples"]
