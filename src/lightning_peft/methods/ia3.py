r"""(IA)^3: learned per-channel scaling vectors on a frozen layer (Liu et al. 2022).

For a base weight viewed as ``W: [out, in]``, bias ``b`` and input ``x: [..., in]``:

    output scaling (attention-style targets)   y = l * (W x + b),     l: [out]   (file: [out, 1])
    input scaling  (feed-forward targets)      y = W (l * x) + b,     l: [in]    (file: [1, in])

``l`` starts at ones, so the adapted layer is the base layer exactly. Merging folds ``l`` into
the weight: ``W <- diag(l) W, b <- l * b`` (output) or ``W <- W diag(l)`` (input); unmerging
divides it out again. Names and shapes follow HF PEFT (``ia3_l``), so files round-trip.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import WeightLayer, base_kind


class IA3Layer(WeightLayer):
    """A frozen ``nn.Linear`` / ``Conv1D`` (float or bitsandbytes) plus named (IA)^3 vectors."""

    method = "ia3"
    adapter_stores = ("ia3_l", "feedforward")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        kind = base_kind(base_layer)
        if kind not in ("linear", "conv1d"):
            raise TypeError(f"(IA)^3 scales nn.Linear or transformers Conv1D layers, not {type(base_layer).__name__}.")
        self._view_base(base_layer, kind, fan_in_fan_out)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    # ------------------------------------------------------------------------------ adapters
    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    def add_adapter(self, name: str, feedforward: bool) -> None:
        """Create vector ``name`` (ones): ``[1, in]`` scaling the input, or ``[out, 1]`` the output."""
        if name in self.ia3_l:
            raise ValueError(f"adapter {name!r} already exists on this layer; choose another adapter_name.")
        weight = self.base_layer.weight
        # over a quantized base the vector trains in fp32 (as LoRA does); else in the base's dtype
        dtype = torch.float32 if self.quantized else weight.dtype
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))
        self.feedforward[name] = feedforward

    # ------------------------------------------------------------------------------- weights
    def weight_scale(self, name: str) -> torch.Tensor:
        """Vector ``name`` laid out to multiply :meth:`base_weight`: ``[out, 1]`` scales rows, ``[1, in]`` columns."""
        return self.ia3_l[name]

    def merged_base(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W', b')``: the weight (as :meth:`base_weight`) and bias with vector ``name`` folded in,
        in at least fp32; nothing changes in the layer."""
        scale = self.ia3_l[name]
        dtype = torch.promote_types(scale.dtype, torch.float32)
        weight = self.base_weight().to(dtype) * self.weight_scale(name).to(dtype)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and not self.feedforward[name]:
            bias = bias.to(dtype) * scale.to(dtype).flatten()
        return weight, bias

    mergeable = True

    def merge_refusal(self, name: str, allow_lossy: bool = False) -> Exception | None:
        if self.quantized:
            return RuntimeError(f"adapter {name!r} is (IA)^3 over a quantized base: scaling a 4-bit weight in place "
                                f"re-quantizes it and loses the update. Use lightning_peft.export_merged(model, "
                                f"directory) to write a merged float model.")
        return None

    def merge(self, name: str, allow_lossy: bool = False) -> None:
        """Fold vector ``name`` into the float base weight (and bias) in place (never lossy: a
        quantized base is refused whatever ``allow_lossy`` says)."""
        refusal = self.merge_refusal(name)
        if refusal is not None:
            raise refusal
        with torch.no_grad():
            weight, bias = self.merged_base(name)
            self.base_weight().copy_(weight)
            if bias is not None and not self.feedforward[name]:
                self.base_layer.bias.copy_(bias)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Divide vector ``name`` back out of the base weight (and bias)."""
        scale = self.ia3_l[name].detach()
        if (scale == 0).any():
            raise RuntimeError(f"(IA)^3 vector {name!r} has zero entries: its merge cannot be undone by division. "
                               f"Reload the base model and the adapter (load_adapter).")
        with torch.no_grad():
            dtype = torch.promote_types(scale.dtype, torch.float32)
            weight = self.base_weight()
            weight.copy_(weight.to(dtype) / self.weight_scale(name).detach().to(dtype))
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None and not self.feedforward[name]:
                bias.copy_(bias.to(dtype) / scale.to(dtype).flatten())
        self.merged.remove(name)

    def merged_state(self, name: str | None, base_state) -> dict[str, torch.Tensor]:
        if name in self.ia3_l and name not in self.merged:
            weight, bias = self.merged_base(name)
        else:
            weight, bias = self.base_weight(), getattr(self.base_layer, "bias", None)
        state = {"weight": weight.t() if self.transposed else weight}
        if bias is not None:
            state["bias"] = bias
        return state

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        if self.disabled or name not in self.ia3_l or name in self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l[name].flatten()
        if self.feedforward[name]:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)
