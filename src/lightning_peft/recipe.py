r"""The recipe's optimizer: AdamW over the trainable tensors, linear warm-up, cosine decay to a floor.

For optimizer step ``k = 0, 1, ...`` (Lightning steps the scheduler after every optimizer step),
``T`` total steps, ``W = ceil(warmup_ratio * T)`` warm-up steps and floor ``m = min_lr_ratio``:

    lr_k = lr * (k + 1) / (W + 1)                                  k <  W   (linear warm-up)
    lr_k = lr * (m + (1 - m) * (1 + cos(pi * p_k)) / 2)            k >= W   (cosine decay)
    p_k  = min(1, (k - W) / max(1, T - 1 - W))

Step ``W`` trains at ``lr``, the last step (``k = T - 1``) at ``m * lr``, and steps past ``T`` (an
estimate that was short) stay at the floor. The warm-up starts at ``lr / (W + 1)``, not at 0: no
optimizer step is spent at a learning rate of zero.

Recipe defaults: ``lr=1e-4``, 3% warm-up, decay to 10% of ``lr``, no weight decay (the adapters
are a small, zero-initialised update; decaying them only pulls the model back to the base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class WarmupCosine:
    """The LR factor of step ``k`` (a ``LambdaLR`` lambda): see the module docstring.

    A dataclass rather than a closure: ``LambdaLR.state_dict`` keeps its fields, so a resumed run
    continues the schedule it started with even if its step estimate changed."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - 1 - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def recipe_optimizer(module: nn.Module, lr: float = 1e-4, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1,
                     weight_decay: float = 0.0, total_steps: int | None = None) -> dict[str, Any]:
    """AdamW over the trainable tensors of ``module`` and the warm-up + cosine schedule, as
    ``configure_optimizers`` returns them::

        def configure_optimizers(self):
            return lightning_peft.recipe_optimizer(self, lr=1e-4)

    Args:
        module: the LightningModule (or any module): only tensors with ``requires_grad=True`` are
            optimized, so call it after adapters are injected (a lightning-peft strategy injects
            them before ``configure_optimizers`` runs).
        lr: the peak learning rate.
        warmup_ratio: share of ``total_steps`` spent warming up, in [0, 1).
        min_lr_ratio: the floor of the cosine decay as a share of ``lr``, in [0, 1].
        weight_decay: AdamW's decoupled weight decay.
        total_steps: optimizer steps in the run; default ``module.trainer.estimated_stepping_batches``
            (it accounts for ``max_steps``, ``max_epochs``, gradient accumulation and devices).

    Returns ``{"optimizer": AdamW, "lr_scheduler": {"scheduler": LambdaLR, "interval": "step",
    "frequency": 1}}``.
    """
    if not lr > 0:
        raise ValueError(f"recipe_optimizer(lr={lr!r}): the peak learning rate must be > 0 (the recipe uses 1e-4).")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"recipe_optimizer(warmup_ratio={warmup_ratio!r}): give the share of the steps spent warming "
                         f"up, in [0, 1) (the recipe uses 0.03).")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"recipe_optimizer(min_lr_ratio={min_lr_ratio!r}): give the floor of the decay as a share "
                         f"of lr, in [0, 1] (0.1 decays to lr/10; 1 keeps lr constant after the warm-up).")
    if not weight_decay >= 0:
        raise ValueError(f"recipe_optimizer(weight_decay={weight_decay!r}): must be >= 0.")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"recipe_optimizer: {type(module).__name__} has no tensor with requires_grad=True. Call it "
                         f"from configure_optimizers under a lightning-peft strategy (strategy='qlora' injects the "
                         f"adapters first), or after lightning_peft.inject_adapters.")
    total_steps = _total_steps(module) if total_steps is None else total_steps
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"recipe_optimizer(total_steps={total_steps!r}): give the number of optimizer steps (>= 1).")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # rounded first: 0.07 * 100 is 7.000000000000001 in floats, which must not give 8 warm-up steps
    schedule = WarmupCosine(math.ceil(round(warmup_ratio * total_steps, 9)), total_steps, float(min_lr_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _total_steps(module: nn.Module) -> int:
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        raise RuntimeError(f"recipe_optimizer: {type(module).__name__} is not attached to a Trainer, so the number of "
                           f"steps is unknown; pass total_steps=..., or call it from configure_optimizers.")
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError("recipe_optimizer: the Trainer has no step or epoch limit (max_steps=-1, max_epochs=-1), so "
                         "the cosine decay has no end; set max_steps or max_epochs, or pass total_steps=....")
    return int(steps)
