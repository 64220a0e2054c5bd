"""What every adapter-carrying module has in common (a small protocol, not a class web).

An adapter module wraps one module of the user's model and holds zero or more *named* adapters.
``active_adapter`` picks which one runs; ``disabled`` switches all of them off (the base model's
function, e.g. the DPO reference). ``adapter_state(name)`` lists that adapter's tensors under the
local key names of the HF PEFT file format; saving, loading, freezing and reporting all go
through it, so a new method only has to describe its tensors once.

Most adapter modules wrap one layer (``wrapped_attr`` names it). Prompt and prefix tuning are
*model-level*: one module hangs off the model itself and wraps nothing (``wrapped_attr = None``);
its file keys are not prefixed by a module path (``model_level = True``).
"""

from __future__ import annotations

import abc

import torch
from torch import nn


class AdapterModule(nn.Module, abc.ABC):
    """Base of the modules that :func:`lightning_peft.inject_adapters` puts into a model."""

    method = "adapter"  # short name used by adapter_report
    wrapped_attr: str | None = "base_layer"  # the user's module this one wraps (None: wraps none)
    model_level = False  # True: file keys are global (``prompt_embeddings``), not under this module's path
    adapter_stores: tuple[str, ...] = ()  # attributes keyed by adapter name (ParameterDict, ModuleDict, dict)
    # False: the stores hold only this method's own tensors and modules, never a user's module, so
    # adapter_modules() need not walk into them (LoRA's lora_A/lora_B are most of a model's modules)
    stores_hold_user_modules = False

    def __getattr__(self, attr: str):
        # Model code reads attributes of the layer it built (``q_proj.weight.dtype``,
        # ``c_attn.nf``, ``lm_head.weight`` for tying): let them through to the wrapped module.
        try:
            return super().__getattr__(attr)
        except AttributeError:
            if self.wrapped_attr is None or attr == self.wrapped_attr:
                raise
            return getattr(super().__getattr__(self.wrapped_attr), attr)

    def __init__(self) -> None:
        super().__init__()
        self.active_adapter: str | None = None
        self.disabled = False

    @abc.abstractmethod
    def adapter_names(self) -> list[str]:
        """Names of the adapters this module holds, in insertion order."""

    @abc.abstractmethod
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """``{key in the PEFT file, relative to this module: tensor}`` for adapter ``name``."""

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` and its tensors: its entry in each of ``adapter_stores``."""
        for attr in self.adapter_stores:
            store = getattr(self, attr)
            if name in store:
                del store[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def trainable_tensors(self, name: str) -> list[torch.Tensor]:
        """The tensors that train for adapter ``name``: those of :meth:`adapter_state`, unless the
        file holds a value computed from them (a prefix behind its reparameterising MLP)."""
        return list(self.adapter_state(name).values())

    def method_name(self, name: str) -> str:
        """The method of adapter ``name`` in this module (for ``adapter_report``)."""
        return self.method

    def unwrapped(self) -> nn.Module | None:
        """What takes this module's place once its last adapter is gone: the wrapped module, or
        None (the module is simply removed)."""
        return getattr(self, self.wrapped_attr) if self.wrapped_attr else None

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapter!r}, disabled={self.disabled}"
