"""Fully trained modules (``modules_to_save``): a per-adapter copy beside the frozen original.

Typical use: a freshly initialised classification head (``score``) or a resized ``lm_head``.
Layout matches HF PEFT's (``original_module`` + ``modules_to_save.<adapter>``), and in the file
the copy's tensors sit under the module's own path (``<path>.weight``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import AdapterModule


class ModulesToSave(AdapterModule):
    """Runs the active adapter's trainable copy; the original when disabled or none is active."""

    method = "modules_to_save"
    wrapped_attr = "original_module"
    adapter_stores = ("modules_to_save",)
    stores_hold_user_modules = True  # copies of the user's modules, which may hold adapter layers

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].named_parameters())

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module; choose another adapter_name.")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    # nothing to fold: the trained copy is the module of the merged model, and keeps running
    mergeable = True

    def merge(self, name: str, allow_lossy: bool = False) -> None:
        return None

    def merged_state(self, name: str | None, base_state) -> dict[str, torch.Tensor]:
        chosen = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
        return base_state(chosen)

    def forward(self, *args, **kwargs):
        name = self.active_adapter
        if self.disabled or name not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[name](*args, **kwargs)
