r"""Swap the optimizer from ``configure_optimizers`` for bitsandbytes' 8-bit and/or paged AdamW.

Optimizer state bytes per trainable parameter (two Adam moments ``m``, ``v``):

    torch AdamW (fp32)        4 + 4                          = 8
    bitsandbytes 8-bit        1 + 1 + 2 * 4 / 256            = 2.03   (uint8 codes + one fp32 absmax
                                                                       per block of 256 per moment)
plus two 256-entry code tables (2 KiB) shared by the whole optimizer. Tensors with fewer than
``min_8bit_size`` elements (bitsandbytes' default 4096) keep fp32 moments: on small adapters
(r=16 on a 64-wide layer is 1024 elements) an "8-bit" optimizer stores no 8-bit state at all.

Paged optimizers put state buffers of tensors with at least 1e5 elements in CUDA unified memory
that the driver evicts to CPU RAM under memory pressure; on the CPU, bitsandbytes allocates plain
buffers instead (same numbers, nothing to page).

The swap happens in ``on_fit_start``, the point in Lightning's order (docs/architecture.md, "Lightning's call order, and its traps") where

- ``strategy.setup`` has run: the optimizers exist and the parameters sit on their device;
- the checkpoint's optimizer and scheduler states have *not* been restored yet, so on
  ``fit(ckpt_path=...)`` Lightning loads the saved bitsandbytes state into the new optimizer.

Each param group is copied whole (``lr``, ``betas``, ``eps``, ``weight_decay``, and what LR
schedulers keep there: ``initial_lr``, OneCycleLR's ``max_lr``/``min_lr``, ...) minus torch's
implementation switches and minus frozen parameters; group positions are kept, so schedulers'
per-group ``base_lrs`` still line up. Each scheduler (and each child of a SequentialLR /
ChainedScheduler, which steps its children directly) is re-pointed at the new optimizer.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import bitsandbytes as bnb
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

OPTIMIZERS = {
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    "paged_adamw": bnb.optim.PagedAdamW,
    "adamw_8bit": bnb.optim.AdamW8bit,
}

# param-group keys of torch's Adam/AdamW that bitsandbytes has no use for: implementation switches
# (no effect on the numbers) and the three checked by ``_check_group`` before they are dropped
_TORCH_ONLY_KEYS = {"foreach", "fused", "capturable", "differentiable", "amsgrad", "maximize",
                    "decoupled_weight_decay"}


class PagedOptimizer(Callback):
    """Rebuild every Adam/AdamW optimizer as bitsandbytes' ``PagedAdamW8bit`` (default),
    ``PagedAdamW`` or ``AdamW8bit``, with the same param groups and hyperparameters.

    Args:
        optimizer: ``"paged_adamw_8bit"``, ``"paged_adamw"`` (32-bit state, paged) or ``"adamw_8bit"``.
        min_8bit_size: tensors with fewer elements keep 32-bit state (bitsandbytes' default 4096).
            Lower it to get 8-bit state on small adapters.

    A run resumed with ``fit(ckpt_path=...)`` needs the same ``optimizer`` as the run that wrote
    the checkpoint (the saved state is that optimizer's).
    """

    def __init__(self, optimizer: str = "paged_adamw_8bit", min_8bit_size: int = 4096) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"PagedOptimizer(optimizer={optimizer!r}): unknown name; choose one of "
                             f"{', '.join(map(repr, OPTIMIZERS))}.")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"PagedOptimizer(min_8bit_size={min_8bit_size!r}): give a number of elements >= 0 "
                             f"(tensors with fewer elements keep 32-bit optimizer state; bitsandbytes' default 4096).")
        self.optimizer = optimizer
        self.min_8bit_size = min_8bit_size

    # ------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_optimizers(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning's restore of a resumed run's optimizer state (fresh runs have none yet)
        if self.optimizer.startswith("paged"):
            for optimizer in trainer.strategy.optimizers:
                page_restored_state(optimizer)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_resumed_state(checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer}

    # ----------------------------------------------------------------------------------- worker
    def _swap_optimizers(self, trainer: pl.Trainer) -> None:
        swapped = {id(old): self._rebuild(old, i) for i, old in enumerate(trainer.strategy.optimizers)}
        for config in trainer.lr_scheduler_configs:
            _repoint(config.scheduler, swapped)
        for old in trainer.strategy.optimizers:
            if hasattr(old.step, "_wrapped_by_lr_sched"):
                _track_step_calls(swapped[id(old)])
        trainer.strategy.optimizers = list(swapped.values())

        params = [p for new in swapped.values() for group in new.param_groups for p in group["params"]]
        if self.optimizer.startswith("paged") and any(p.device.type == "cpu" for p in params):
            rank_zero_warn(f"PagedOptimizer({self.optimizer!r}): the parameters are on the CPU, where bitsandbytes "
                           f"has no paged memory; the optimizer state is kept in ordinary CPU memory (same updates, "
                           f"nothing paged). optimizer='adamw_8bit' does the same without this warning.")
            for new in swapped.values():
                new._cpu_paged_warned = True  # bitsandbytes would say it again at the first step

    def _rebuild(self, optimizer: torch.optim.Optimizer, index: int) -> torch.optim.Optimizer:
        cls = OPTIMIZERS[self.optimizer]
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"PagedOptimizer({self.optimizer!r}) rebuilds torch.optim.AdamW / Adam optimizers as "
                            f"bitsandbytes' {cls.__name__}, but configure_optimizers returned "
                            f"{type(optimizer).__name__} (optimizer {index}), which has no {cls.__name__} equivalent. "
                            f"Return torch.optim.AdamW(...) from configure_optimizers, or remove the PagedOptimizer "
                            f"callback and build the bitsandbytes optimizer you want there yourself.")
        groups = []
        for g, group in enumerate(optimizer.param_groups):
            _check_group(group, optimizer, f"optimizer {index}, param group {g}")
            kept = {key: value for key, value in group.items() if key not in _TORCH_ONLY_KEYS}
            # a user's configure_optimizers may hold frozen tensors (adapters injected without our
            # strategy): they get no state. Empty groups stay so that scheduler indices line up.
            groups.append({**kept, "params": [p for p in group["params"] if p.requires_grad]})
        if not any(group["params"] for group in groups):
            raise ValueError(f"PagedOptimizer: optimizer {index} from configure_optimizers has no parameter with "
                             f"requires_grad=True; pass the trainable parameters (or self.parameters()) to it.")
        d = optimizer.defaults
        return cls(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                   min_8bit_size=self.min_8bit_size)

    def _check_resumed_state(self, checkpoint: dict[str, Any]) -> None:
        """The optimizer state in ``checkpoint`` must be this optimizer's: torch's AdamW state (a run
        without this callback) or another bitsandbytes variant would not resume as configured."""
        if not checkpoint.get("optimizer_states"):
            return
        saved = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("optimizer")
        if saved is None:
            raise ValueError(f"PagedOptimizer({self.optimizer!r}): the checkpoint was written without PagedOptimizer, "
                             f"so its optimizer state is the original optimizer's, which {self.optimizer!r} cannot "
                             f"load. Resume it without the callback, or start a new run from its weights "
                             f"(LightningModule.load_from_checkpoint, then fit without ckpt_path).")
        if saved != self.optimizer:
            raise ValueError(f"PagedOptimizer({self.optimizer!r}): the checkpoint holds the state of "
                             f"PagedOptimizer({saved!r}). Resume with PagedOptimizer(optimizer={saved!r}).")


def page_restored_state(optimizer: torch.optim.Optimizer) -> int:
    """Put a resumed paged optimizer's moments back in paged memory; returns how many tensors moved.

    bitsandbytes allocates paged buffers only when a state is first created. Its ``load_state_dict``
    keeps the loaded tensors as they are, and its first step moves them to the GPU as ordinary
    tensors, so a resumed run would hold in plain GPU memory what the uninterrupted run could page
    out to CPU RAM (and run out of memory where that one did not). Each moment (``state1``,
    ``state2``) not already paged is copied into the buffer bitsandbytes' own ``get_state_buffer``
    allocates for its parameter, where that buffer is paged (CUDA, at least 1e5 elements); the
    others (CPU, small tensors) stay as they are."""
    moved = 0
    for param, state in optimizer.state.items():
        for key in ("state1", "state2"):
            value = state.get(key)
            if not torch.is_tensor(value) or getattr(value, "is_paged", False):
                continue
            buffer = optimizer.get_state_buffer(param, dtype=value.dtype)
            if getattr(buffer, "is_paged", False):
                buffer.copy_(value)
                state[key] = buffer
                moved += 1
    return moved


def _check_group(group: dict[str, Any], optimizer: torch.optim.Optimizer, where: str) -> None:
    """Refuse what bitsandbytes' AdamW would silently compute differently."""
    if group.get("amsgrad"):
        raise ValueError(f"PagedOptimizer: {where} has amsgrad=True, but bitsandbytes' AdamW has no AMSGrad. "
                         f"Use amsgrad=False or remove the PagedOptimizer callback.")
    if group.get("maximize"):
        raise ValueError(f"PagedOptimizer: {where} has maximize=True, which bitsandbytes' AdamW does not support. "
                         f"Minimize the negated objective instead, or remove the PagedOptimizer callback.")
    # older torch (pyproject allows 2.4) has no such key: there AdamW decouples the decay and Adam does not
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    if group["weight_decay"] and not decoupled:
        raise ValueError(f"PagedOptimizer: {where} is torch.optim.Adam with weight_decay={group['weight_decay']}, "
                         f"an L2 term added to the gradient; bitsandbytes decays the weights directly (AdamW). "
                         f"Use torch.optim.AdamW (or Adam(decoupled_weight_decay=True)) for AdamW's decay, or "
                         f"weight_decay=0.")


def _repoint(scheduler: Any, swapped: dict[int, torch.optim.Optimizer]) -> None:
    """Point ``scheduler`` and its children (SequentialLR / ChainedScheduler ``_schedulers``, which
    hold their own ``optimizer`` and are stepped directly) at the new optimizers."""
    if id(scheduler.optimizer) in swapped:
        scheduler.optimizer = swapped[id(scheduler.optimizer)]
    for child in getattr(scheduler, "_schedulers", ()):
        _repoint(child, swapped)


def _track_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """Do to ``optimizer`` what torch's ``LRScheduler.__init__`` did to the one it replaces: wrap
    ``step`` to record that it ran. Without it the first ``scheduler.step()`` warns that
    ``optimizer.step()`` was overridden. A weak reference, as in torch, avoids a cycle."""
    step = type(optimizer).step
    ref = weakref.ref(optimizer)

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper
