"""What every adapter-carrying module has in common (a small protocol, not a class web).

An adapter module wraps one module of the user's model and holds zero or more *named* adapters.
``active_adapter`` picks which one runs; ``disabled`` switches all of them off (the base model's
function, e.g. the DPO reference). ``adapter_state(name)`` lists that adapter's tensors under the
local key names of the HF PEFT file format; saving, loading, freezing and reporting all go
through it, so a new method only has to describe its tensors once.

Most adapter modules wrap one layer (``wrapped_attr`` names it). Prompt and prefix tuning are
*model-level*: one module hangs off the model itself and wraps nothing (``wrapped_attr = None``);
its file keys are not prefixed by a module path (``model_level = True``).

Methods that wrap a layer with a weight matrix (LoRA, (IA)^3) see it through one view,
:class:`WeightLayer`: ``W: [out, in]`` whatever the storage (``nn.Linear`` ``[out, in]``,
transformers' ``Conv1D`` ``[in, out]``, ``nn.Embedding`` ``[num, dim]`` as ``[dim, num]``, a
bitsandbytes layer dequantized). :func:`base_kind` tells the layer kinds apart; the adapter
dropout (:mod:`.dropout`) and ``DROPOUT_TYPES`` are re-exported here, so that everything above
``methods/`` reads them from one place.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from ..quantize import dequantize_weight, is_quantized
from .dropout import DROPOUT_TYPES, AdapterDropout  # noqa: F401 (callers read them from here)


def base_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or ``"embedding"`` for layers LoRA can wrap, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"  # transformers.pytorch_utils.Conv1D, duck-typed: no import of transformers
    return None


def weight_shape(base_layer: nn.Module, kind: str) -> tuple[int, int]:
    """``(out, in)`` of the ``[out, in]`` view of a layer of ``kind`` (see :func:`base_kind`)."""
    if kind == "linear":
        return base_layer.out_features, base_layer.in_features
    # Conv1D stores [in, out]; an embedding is a linear map from one-hot [num] to [dim]
    in_features, out_features = base_layer.weight.shape
    return out_features, in_features


class AdapterModule(nn.Module, abc.ABC):
    """Base of the modules that :func:`lightning_peft.inject_adapters` puts into a model."""

    method = "adapter"  # short name used by adapter_report
    wrapped_attr: str | None = "base_layer"  # the user's module this one wraps (None: wraps none)
    model_level = False  # True: file keys are global (``prompt_embeddings``), not under this module's path
    adapter_stores: tuple[str, ...] = ()  # attributes keyed by adapter name (ParameterDict, ModuleDict, dict)
    # False: the stores hold only this method's own tensors and modules, never a user's module, so
    # adapter_modules() need not walk into them (LoRA's lora_A/lora_B are most of a model's modules)
    stores_hold_user_modules = False
    mixes_rows = False  # runs a different adapter per row of a batch (lightning_peft.adapter_ids)

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
        self.merged: list[str] = []  # adapters folded into the wrapped layer (skipped in forward)

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

    # ------------------------------------------------------------------- the merge protocol
    # lightning_peft.merge loops over adapter modules through these methods alone (as PEFT's
    # BaseTunerLayer.merge): a module that cannot fold its adapters keeps ``mergeable = False``
    # and the defaults, which refuse with ``unmergeable_reason``.
    mergeable = False
    unmergeable_reason = "cannot be folded into the base weights"

    def merge_refusal(self, name: str, allow_lossy: bool = False) -> Exception | None:
        """The error :meth:`merge` of adapter ``name`` would raise, or None. ``merge_adapters`` asks
        every module first, so that a refusal leaves the whole model unchanged."""
        if self.mergeable:
            return None
        return ValueError(f"adapter {name!r} is a {self.method_name(name)} adapter, which cannot be folded into the "
                          f"base weights ({self.unmergeable_reason}). Keep the adapter at inference: save_adapter / "
                          f"load_adapter.")

    def merge(self, name: str, allow_lossy: bool = False) -> float | None:
        """Fold adapter ``name`` into the wrapped layer in place and list it in ``merged``. Returns
        the fraction of the update lost (a lossy merge into a quantized weight), else None."""
        raise self.merge_refusal(name, allow_lossy) or NotImplementedError(f"{type(self).__name__}.merge")

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` back out of the wrapped layer (the inverse of :meth:`merge`)."""
        raise NotImplementedError(f"{type(self).__name__} has no merged adapters to take out.")

    def merged_state(self, name: str | None, base_state) -> dict[str, torch.Tensor]:
        """The state dict (keys relative to this module's place) of the plain layer this module
        stands for, with adapter ``name`` folded in when this module holds it unmerged; nothing
        changes. ``base_state(module)`` is the plain state dict of a user module (quantized layers
        dequantized, adapter modules inside it resolved the same way). Default: the wrapped
        module's own state (an unmergeable module holds only other adapters by now)."""
        return base_state(getattr(self, self.wrapped_attr)) if self.wrapped_attr else {}

    def unwrapped(self) -> nn.Module | None:
        """What takes this module's place once its last adapter is gone: the wrapped module, or
        None (the module is simply removed)."""
        return getattr(self, self.wrapped_attr) if self.wrapped_attr else None

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapter!r}, disabled={self.disabled}"


class WeightLayer(AdapterModule):
    """An adapter module over one layer with a weight matrix, seen as ``W: [out, in]``.

    Subclasses call :meth:`_view_base` in ``__init__``; it sets ``base_layer``, ``kind``,
    ``quantized``, ``out_features``, ``in_features`` and ``transposed`` (the stored weight is
    ``[in, out]``: ``Conv1D``, ``Embedding``, or a Linear flagged ``fan_in_fan_out``)."""

    def _view_base(self, base_layer: nn.Module, kind: str, fan_in_fan_out: bool) -> None:
        self.base_layer = base_layer
        self.kind = kind
        self.quantized = is_quantized(base_layer)
        self.out_features, self.in_features = weight_shape(base_layer, kind)
        self.transposed = kind != "linear" or fan_in_fan_out

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]``: a view of a float base, the dequantized weight
        (a new tensor in the original dtype) of a bitsandbytes one."""
        if self.quantized:
            return dequantize_weight(self.base_layer)
        weight = self.base_layer.weight
        return weight.t() if self.transposed else weight

    def set_base_weight(self, new_weight: torch.Tensor) -> None:
        """Write ``new_weight: [out, in]`` into a float base weight in place (same storage)."""
        if self.quantized:
            raise TypeError("the base weight is quantized: it cannot be written in place "
                            "(see lightning_peft.merge_adapters(allow_lossy=True) and export_merged).")
        with torch.no_grad():
            self.base_weight().copy_(new_weight)
