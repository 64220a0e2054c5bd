"""``AdapterCheckpoint``: ModelCheckpoint semantics, but each save is an adapter directory.

A save is a directory in the HF PEFT format (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``peft.PeftModel.from_pretrained``; further adapters in
sub-folders named after them, as PEFT does) plus ``training_state.ckpt``: Lightning's checkpoint
(optimizers, schedulers, loops, callbacks, RNG states) with the adapter tensors only, no base
weights. ``trainer.fit(model, ckpt_path=<that directory>)`` resumes from it.

Each save is written to a hidden temporary directory beside its destination and swapped into
place once complete and flushed to disk; pruned saves are renamed to a hidden name before they are
deleted. A crash at any instant leaves every save (``last`` included) complete, old or new, and no
incomplete directory under a save's name (docs/reliability.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..atomic import atomic_directory, clean_folder, remove_directory
from ..checkpoint import (CHECKPOINT_KEY, TRAINING_STATE, adapter_state_keys, check_checkpoint_adapters,
                          check_checkpoint_structure, check_resume_config, checkpoint_meta,
                          is_save_directory, read_training_state, restore_rng_states, write_adapter_files)
from ..fsdp import gathered_adapters
from ..inject import adapter_configs, check_adapter_name
from ..strategy import _PEFTSetup


class AdapterCheckpointIO(CheckpointIO):
    """Reads adapter-checkpoint directories (their ``training_state.ckpt``); anything else goes to
    the checkpoint IO it wraps. Installed by :class:`AdapterCheckpoint` so that
    ``fit(ckpt_path=<directory>)`` works with any strategy."""

    def __init__(self, wrapped: CheckpointIO) -> None:
        self.wrapped = wrapped

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.wrapped.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if is_save_directory(path):
            return read_training_state(path, map_location, weights_only)
        return self.wrapped.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        self.wrapped.teardown()


class AdapterCheckpoint(ModelCheckpoint):
    """Save adapter directories during training; arguments as ``ModelCheckpoint``'s.

    Args:
        dirpath: where the save directories go (``epoch=0-step=10``, ``last``, ...).
        monitor / mode / save_top_k: keep the best ``save_top_k`` by ``monitor`` (the last one when
            ``monitor`` is None); older saves are deleted.
        every_n_train_steps / every_n_epochs: how often to save (default: every epoch).
        save_last: also keep an up-to-date ``last`` directory.

    ``best_adapter_path`` is the best save's directory. Only global rank 0 writes.
    """

    FILE_EXTENSION = ""  # a save is a directory

    def __init__(self, dirpath, monitor: str | None = None, mode: str = "min", save_top_k: int = 1,
                 every_n_train_steps: int | None = None, every_n_epochs: int | None = None,
                 save_last: bool = True, filename: str | None = None, **kwargs: Any) -> None:
        if save_last not in (True, False, None):
            raise ValueError(f"save_last={save_last!r}: AdapterCheckpoint supports True or False (a 'link' to a "
                             f"directory is not portable).")
        if kwargs.get("save_weights_only"):
            raise ValueError("save_weights_only=True: an adapter save is small already, and training_state.ckpt is "
                             "what makes it resumable; use lightning_peft.save_adapter for adapter files alone.")
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_top_k=save_top_k,
                         every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
                         save_last=save_last, **kwargs)

    @property
    def best_adapter_path(self) -> str:
        return self.best_model_path

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(trainer.strategy.checkpoint_io, AdapterCheckpointIO):  # before any restore
            trainer.strategy.checkpoint_io = AdapterCheckpointIO(trainer.strategy.checkpoint_io)
        if not isinstance(trainer.strategy, _PEFTSetup):
            # our saves hold no base weights: Lightning's own strategies must not demand them
            # (on_load_checkpoint below checks the adapter keys strictly instead)
            pl_module.strict_loading = False

    def on_fit_start(self, trainer, pl_module) -> None:
        if not adapter_configs(pl_module):  # strategies inject in their setup, after ours
            raise RuntimeError("AdapterCheckpoint found no adapters in the LightningModule; use a lightning-peft "
                               "strategy (e.g. strategy='qlora') or call lightning_peft.inject_adapters on its model.")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # our strategies restore the RNG states themselves; under any other strategy do it here
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta and not isinstance(trainer.strategy, _PEFTSetup):
            check_checkpoint_structure(checkpoint)
            check_resume_config(pl_module, checkpoint)
            check_checkpoint_adapters(pl_module, checkpoint)
            restore_rng_states(meta)

    # a save of non-finite adapters is neither written nor ranked (best_adapter_path never points at one)
    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._adapters_finite(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._adapters_finite(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _adapters_finite(self, trainer) -> bool:
        """Whether every adapter tensor is finite, decided on all ranks together (FSDP shards)."""
        module = trainer.lightning_module
        keys = adapter_state_keys(module)
        tensors = [t.to_local() if hasattr(t, "to_local") else t
                   for k, t in module.state_dict(keep_vars=True).items() if k in keys and t.is_floating_point()]
        finite = True
        if tensors:
            norms = torch._foreach_norm([t.detach() for t in tensors], float("inf"))
            finite = bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            rank_zero_warn(f"AdapterCheckpoint: the adapters hold non-finite values (NaN/inf) at global step "
                           f"{trainer.global_step}; not saved and not ranked. The last finite save stays: "
                           f"{self._last_checkpoint_saved or 'none yet'}. (lightning-peft strategies stop at the first "
                           f"non-finite step by default; this run's strategy let one through.)")
        return finite

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        module = trainer.lightning_module
        keys = adapter_state_keys(module)  # the strategy may not be ours: drop the base here
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint.setdefault(CHECKPOINT_KEY, checkpoint_meta(module))
        with gathered_adapters(module):  # FSDP: every rank gathers the shards, rank 0 writes
            if trainer.is_global_zero:
                _write_directory(Path(filepath), module, checkpoint, trainer)
        trainer.strategy.barrier("AdapterCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if trainer.is_global_zero and os.path.isdir(filepath):
            remove_directory(filepath)  # renamed aside first: never a half-deleted save under its name


def _write_directory(path: Path, module, checkpoint: dict[str, Any], trainer=None) -> None:
    """Write a complete save into a temporary sibling, then swap it into place atomically
    (:func:`lightning_peft.atomic.atomic_directory`): ``last`` and a re-saved step are at every
    instant the complete old or the complete new save."""
    clean_folder(path.parent)  # leftovers of saves killed mid-write or mid-prune, whatever their name
    with atomic_directory(path) as tmp:
        for index, name in enumerate(adapter_configs(module)):
            # a further adapter goes into a sub-folder named after it: the name must be one path component
            check_adapter_name(name)
            write_adapter_files(module, tmp if index == 0 else tmp / name, name, trainer=trainer)
        torch.save(checkpoint, tmp / TRAINING_STATE)
