r"""(IA)^3 on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (HF PEFT's layout: ``ia3_l`` of shape
``[1, C, 1, ...]``, one entry per channel).

    output scaling   y = l * (conv(x; W) + b),   l: [1, out, 1, ...]
    input scaling    y = conv(l * x; W) + b,     l: [1, in, 1, ...]   (feed-forward targets)

Merging folds ``l`` into the kernel ``W: [out, in/g, *k]``: output scaling multiplies output
channel ``o`` (and the bias); input scaling multiplies, in group ``j``, kernel slice ``c`` by
``l[j * in/g + c]``. Both are exact for any ``groups``. bitsandbytes has no 4-bit convolution, so
the base stays float under ``quantize_base``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterModule
from .ia3 import IA3Layer
from .lora_conv import is_conv


class IA3ConvLayer(IA3Layer):
    """A frozen ``nn.Conv1d/2d/3d`` plus named (IA)^3 channel scalings."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        AdapterModule.__init__(self)
        if not is_conv(base_layer):
            raise TypeError(f"IA3ConvLayer scales nn.Conv1d/2d/3d, not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.quantized = False
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.transposed = False
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        self.merged: list[str] = []

    def add_adapter(self, name: str, feedforward: bool) -> None:
        if name in self.ia3_l:
            raise ValueError(f"adapter {name!r} already exists on this layer; choose another adapter_name.")
        weight = self.base_layer.weight
        channels = self.in_features if feedforward else self.out_features
        shape = (1, channels) + (1,) * (weight.dim() - 2)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=weight.device, dtype=weight.dtype))
        self.feedforward[name] = feedforward

    def base_weight(self) -> torch.Tensor:
        """The kernel itself, ``[out, in/g, *k]``."""
        return self.base_layer.weight

    def weight_scale(self, name: str) -> torch.Tensor:
        """The vector laid out to multiply the kernel ``[out, in/g, *k]``."""
        scale = self.ia3_l[name]
        if not self.feedforward[name]:
            return scale.transpose(0, 1)  # [out, 1, 1, ...]: scales output channels
        groups = self.base_layer.groups
        if groups == 1:
            return scale  # [1, in, 1, ...]
        per_group = self.in_features // groups
        out_per_group = self.out_features // groups
        trailing = scale.shape[2:]
        grouped = scale.reshape(groups, 1, per_group, *trailing).expand(groups, out_per_group, per_group, *trailing)
        return grouped.reshape(self.out_features, per_group, *trailing)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        if self.disabled or name not in self.ia3_l or name in self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[name]
        if self.feedforward[name]:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)
