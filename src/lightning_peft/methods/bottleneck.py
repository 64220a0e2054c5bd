r"""Serial bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) after a model's blocks.

For a wrapped block ``f`` (a feed-forward or attention block) with output ``h: [..., d]``:

    h <- h + U act(D h + c) + e,     D: [k, d],  c: [k],  U: [d, k],  e: [d],   k = max(1, d // rf)

``U`` and ``e`` start at zero, so the adapted model starts as the base model. A block that
returns a tuple (attention: output, weights, ...) has its first element adapted. The adapter sits
before the residual addition of the surrounding layer, where the papers put it. It is nonlinear,
so it cannot be merged into the base weights. File keys (ours, PEFT has no serial adapters):
``<block path>.adapter_down.weight``/``.bias``, ``<block path>.adapter_up.weight``/``.bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import is_quantized
from .base import AdapterModule, base_kind

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def block_width(block: nn.Module) -> int | None:
    """Output width ``d`` of a block: that of its last linear layer (Llama's ``down_proj`` /
    ``o_proj``, GPT-2's ``c_proj``), or None if it has none."""
    width = None
    for module in block.modules():
        kind = base_kind(module)
        if kind == "linear":
            width = module.out_features
        elif kind == "conv1d":
            width = module.weight.shape[1]
    return width


class BottleneckLayer(AdapterModule):
    """A frozen block followed by named bottleneck adapters on its output."""

    method = "bottleneck"
    adapter_stores = ("adapter_down", "adapter_up", "activation")
    unmergeable_reason = "bottleneck adapters are nonlinear"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        width = block_width(base_layer)
        if width is None:
            raise TypeError(f"a bottleneck adapter follows a block with linear layers (its output width is that of "
                            f"the last one); {type(base_layer).__name__} has none.")
        self.base_layer = base_layer
        self.width = width
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.activation: dict[str, str] = {}

    def adapter_names(self) -> list[str]:
        return list(self.activation)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def add_adapter(self, name: str, reduction_factor: int, activation: str) -> None:
        """Create adapter ``name``: ``D`` with nn.Linear's default init, ``U = 0, e = 0``."""
        if name in self.activation:
            raise ValueError(f"adapter {name!r} already exists on this block; choose another adapter_name.")
        reference = next(p for p in self.base_layer.parameters())
        quantized = any(is_quantized(m) for m in self.base_layer.modules())
        dtype = reference.dtype if reference.is_floating_point() and not quantized else torch.float32
        hidden = max(1, self.width // reduction_factor)
        factory = {"device": reference.device, "dtype": dtype}
        self.adapter_down[name] = nn.Linear(self.width, hidden, **factory)
        self.adapter_up[name] = nn.Linear(hidden, self.width, **factory)
        nn.init.zeros_(self.adapter_up[name].weight)
        nn.init.zeros_(self.adapter_up[name].bias)
        self.activation[name] = activation

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        name = self.active_adapter
        if self.disabled or name not in self.activation:
            return out
        h = out[0] if isinstance(out, tuple) else out
        down = self.adapter_down[name]
        z = self.adapter_up[name](ACTIVATIONS[self.activation[name]](down(h.to(down.weight.dtype))))
        h = h + z.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h
