r"""LoRA on a parameter (``LoraConfig(target_parameters=[...])``): the update goes into the weight,
not beside the layer's output, for modules that use an ``nn.Parameter`` directly (MoE experts
stored as one ``[experts, out, in]`` tensor, custom layers ``x @ self.weight``).

For a wrapped parameter ``P`` the module computes its forward with ``P + s * delta`` in place of
``P`` (``torch.func.functional_call``: the update is differentiable, ``P`` is never written):

    2-D  P: [d0, d1]               delta = B A,              A: [r, d1],  B: [d0, r]
    3-D  P: [E, d1, d2] (experts)  delta[e] = B_e A_e        A: [E r, in], B: [out, E r]
                                   A_e = rows e*r .. e*r+r-1 of A,  B_e = columns e, E+e, 2E+e, ... of B
                                   (out, in) = (d1, d2), or (d2, d1) with delta[e] transposed when the
                                   module sets ``is_transposed`` (experts stored [E, in, out])

as HF PEFT's ``ParamWrapper``, whose file keys (``<module path>.lora_A.weight`` /
``.lora_B.weight``) and shapes these are. Merging adds ``s * delta`` to ``P``; unmerging subtracts
it. As in PEFT: no dropout (the input never meets the adapter alone), no DoRA, no ``lora_bias``,
and no mixed-adapter batches. Several parameters of one module (an MoE block's ``gate_up_proj``
and ``down_proj``) nest one wrapper per parameter, the first parameter innermost, as PEFT does:
its keys are then ``<path>.base_layer.lora_A.weight`` and ``<path>.lora_A.weight``.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.func import functional_call

from .base import AdapterModule
from .lora import init_lora_factors, lora_scaling


class LoraParamLayer(AdapterModule):
    """A module whose parameter ``parameter_name`` carries named LoRA updates."""

    method = "lora"
    adapter_stores = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__()
        param = getattr(base_layer, parameter_name, None)
        if not isinstance(param, nn.Parameter) or param.dim() not in (2, 3) or not param.is_floating_point():
            raise ValueError(f"target_parameters: {type(base_layer).__name__}.{parameter_name} is "
                             f"{'not an nn.Parameter' if not isinstance(param, nn.Parameter) else tuple(param.shape)}; "
                             f"LoRA adapts 2-D [out, in] and 3-D [experts, out, in] float parameters.")
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.transposed = bool(getattr(base_layer, "is_transposed", False)) and param.dim() == 3
        if param.dim() == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, param.shape
        else:
            self.num_experts, d1, d2 = param.shape
            self.in_features, self.out_features = (d1, d2) if self.transposed else (d2, d1)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def param(self) -> nn.Parameter:
        return getattr(self.base_layer, self.parameter_name)

    def _param_path(self) -> str:
        """The parameter's name relative to ``base_layer`` (through nested wrappers)."""
        prefix, module = "", self.base_layer
        while isinstance(module, LoraParamLayer):
            prefix, module = prefix + "base_layer.", module.base_layer
        return prefix + self.parameter_name

    def chain(self) -> tuple[list["LoraParamLayer"], nn.Module]:
        """``(wrappers from this one inwards, the user's module)``."""
        layers, module = [self], self.base_layer
        while isinstance(module, LoraParamLayer):
            layers.append(module)
            module = module.base_layer
        return layers, module

    # ------------------------------------------------------------------------------ adapters
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.scaling.pop(name, None)

    def add_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool = False,
                    init_lora_weights: bool | str = True) -> None:
        """Create adapter ``name`` of rank ``r`` (per expert). ``init_lora_weights``: True (Kaiming
        A, zero B), ``"gaussian"`` (A ~ N(0, 1/r), zero B) or False (both random, for tests)."""
        if name in self.scaling:
            raise ValueError(f"adapter {name!r} already exists on this parameter; choose another adapter_name.")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not available for target_parameters; use "
                             f"True, False or 'gaussian'.")
        param = self.param()
        factory = {"device": param.device, "dtype": param.dtype}
        rank = r * self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.scaling[name] = lora_scaling(lora_alpha, r, use_rslora)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            init_lora_factors(A, B, init_lora_weights, r)

    # ------------------------------------------------------------------------------- weights
    def delta(self, name: str) -> torch.Tensor:
        """``s * delta``, shaped like the parameter, in the adapter's dtype (differentiable)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if self.num_experts == 1:
            return self.scaling[name] * (B @ A)
        E = self.num_experts
        A3 = A.reshape(E, -1, self.in_features)                     # [E, r, in]
        B3 = B.reshape(self.out_features, -1, E).permute(2, 0, 1)   # [E, out, r]
        delta = B3 @ A3                                             # [E, out, in]
        return self.scaling[name] * (delta.transpose(1, 2) if self.transposed else delta)

    # ------------------------------------------------------------------------------- merging
    mergeable = True

    def merge(self, name: str, allow_lossy: bool = False) -> None:
        """Add adapter ``name``'s update to the parameter in place (fp32 arithmetic)."""
        with torch.no_grad():
            param = self.param()
            param.copy_(param.float() + self.delta(name).float())
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        with torch.no_grad():
            param = self.param()
            param.copy_(param.float() - self.delta(name).float())
        self.merged.remove(name)

    def merged_param(self, name: str) -> torch.Tensor:
        """The parameter with adapter ``name`` added, fp32 or wider; nothing changes."""
        param = self.param()
        delta = self.delta(name)
        dtype = torch.promote_types(delta.dtype, torch.float32)
        return param.to(dtype) + delta.to(dtype)

    def merged_state(self, name: str | None, base_state) -> dict[str, torch.Tensor]:
        state = base_state(self.base_layer)  # the module's own state (inner wrappers resolved), this parameter updated
        if name in self.scaling and name not in self.merged:
            state[self.parameter_name] = self.merged_param(name)
        return state

    # ------------------------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        name = self.active_adapter
        if self.disabled or name not in self.scaling or name in self.merged:
            return self.base_layer(*args, **kwargs)
        param = self.param()
        adapted = param + self.delta(name).to(param.dtype)
        return functional_call(self.base_layer, {self._param_path(): adapted}, args, kwargs)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, experts={self.num_experts}, " + super().extra_repr()
