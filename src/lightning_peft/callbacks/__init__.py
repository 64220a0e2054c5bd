"""Lightning callbacks; each works alone, with a lightning-peft strategy or with adapters injected
by ``lightning_peft.inject_adapters``."""

from .adapter_checkpoint import AdapterCheckpoint
from .chat_template_guard import ChatTemplateGuard
from .contamination_guard import ContaminationGuard, ContaminationReport, drop_contaminated, find_contamination
from .epoch_guard import EpochGuard
from .forgetting_probe import ForgettingProbe
from .merge_adapters import MergeAdapters
from .overfitting_guard import OverfittingGuard
from .paged_optimizer import PagedOptimizer
from .rank_monitor import RankMonitor
from .review_samples import ReviewSamples

__all__ = ["AdapterCheckpoint", "ChatTemplateGuard", "ContaminationGuard", "ContaminationReport", "EpochGuard", "ForgettingProbe", "MergeAdapters", "OverfittingGuard",
           "PagedOptimizer", "RankMonitor", "ReviewSamples", "drop_contaminated", "find_contamination"]
