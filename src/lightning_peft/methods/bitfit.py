r"""BitFit: train bias terms only (Ben Zaken et al. 2022).

A targeted module ``f`` (a linear layer, ``Conv1D`` or LayerNorm) gets a learned shift per output
channel, zero at init:

    y = f(x) + d,      d: [out]           (the bias becomes b + d; a module without one gets d)

The base's own bias is never written while training, so adapters can be switched, disabled or
deleted, and a 4-bit base works too (its bias is float). Merging adds ``d`` into the bias (and
creates the bias of a layer that had none); that is exact even over a quantized weight.
File key (ours, PEFT has no BitFit): ``<module path>.bitfit_bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantize import is_quantized
from .base import AdapterModule, base_kind


def bias_size(module: nn.Module) -> int | None:
    """Width of the bias ``module`` has or could have (its output channels), or None."""
    kind = base_kind(module)
    if kind == "linear":
        return module.out_features
    if kind == "conv1d":
        return module.weight.shape[1]
    bias = getattr(module, "bias", None)
    return bias.numel() if isinstance(bias, torch.Tensor) and bias.dim() == 1 else None


class BitFitLayer(AdapterModule):
    """A frozen module plus named bias shifts added to its output."""

    method = "bitfit"
    adapter_stores = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        size = bias_size(base_layer)
        if size is None:
            raise TypeError(f"BitFit trains biases of nn.Linear, Conv1D or modules with a 1-d bias (LayerNorm); "
                            f"{type(base_layer).__name__} has none.")
        self.base_layer = base_layer
        self.size = size
        self.bitfit_bias = nn.ParameterDict()
        self.created_bias = False  # merge gave the base a bias it did not have: unmerge removes it

    def adapter_names(self) -> list[str]:
        return list(self.bitfit_bias)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"bitfit_bias": self.bitfit_bias[name]}

    def add_adapter(self, name: str) -> None:
        if name in self.bitfit_bias:
            raise ValueError(f"adapter {name!r} already exists on this layer; choose another adapter_name.")
        reference = getattr(self.base_layer, "bias", None)
        reference = reference if reference is not None else self.base_layer.weight
        dtype = reference.dtype if reference.is_floating_point() and not is_quantized(self.base_layer) else torch.float32
        self.bitfit_bias[name] = nn.Parameter(torch.zeros(self.size, device=reference.device, dtype=dtype))

    # -------------------------------------------------------------------------------- merging
    def merged_bias(self, name: str) -> torch.Tensor:
        """``b + d`` (or ``d`` without a base bias) in at least fp32; nothing changes."""
        shift = self.bitfit_bias[name]
        dtype = torch.promote_types(shift.dtype, torch.float32)
        bias = getattr(self.base_layer, "bias", None)
        return shift.to(dtype) if bias is None else bias.to(dtype) + shift.to(dtype)

    mergeable = True  # exact, also over a quantized weight (the bias is float)

    def merge(self, name: str, allow_lossy: bool = False) -> None:
        """Add shift ``name`` into the base bias in place (create the bias if there is none)."""
        with torch.no_grad():
            merged = self.merged_bias(name)
            bias = getattr(self.base_layer, "bias", None)
            if bias is None:
                self.base_layer.bias = nn.Parameter(merged.to(self.bitfit_bias[name].dtype), requires_grad=False)
                self.created_bias = True
            else:
                bias.copy_(merged)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        with torch.no_grad():
            if self.created_bias and len(self.merged) == 1:
                self.base_layer.bias = None
                self.created_bias = False
            else:
                bias = self.base_layer.bias
                bias.copy_(bias.to(torch.float32) - self.bitfit_bias[name].to(torch.float32))
        self.merged.remove(name)

    def merged_state(self, name: str | None, base_state) -> dict[str, torch.Tensor]:
        state = base_state(self.base_layer)
        if name in self.bitfit_bias and name not in self.merged:
            state["bias"] = self.merged_bias(name)
        return state

    def forward(self, *args, **kwargs):
        result = self.base_layer(*args, **kwargs)
        name = self.active_adapter
        if self.disabled or name not in self.bitfit_bias or name in self.merged:
            return result
        return result + self.bitfit_bias[name].to(result.dtype)
