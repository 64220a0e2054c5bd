r"""LoRA on ``nn.MultiheadAttention``: its packed ``in_proj`` and its ``out_proj`` (HF PEFT's layout).

``nn.MultiheadAttention`` keeps ``in_proj_weight: [3E, E]`` (query, key and value stacked) as a bare
parameter and reads ``out_proj.weight`` directly instead of calling ``out_proj``: a LoRA layer put
on ``out_proj`` alone never runs (its gradient stays None). So the attention module itself is
wrapped, as PEFT does:

    in_proj:  W_in  + s * B A,      A: [r, E],  B: [3E, r]     (this layer's lora_A / lora_B)
    out_proj: W_out + s * B' A',    A': [r, E], B': [E, r]     (a LoraLayer at base_layer.out_proj)

The forward runs the attention module with the two effective weights in place of its own
(``torch.func.functional_call``), so gradients reach all four factors and the base weights are
never written. File keys follow PEFT: ``<path>.lora_A.weight``, ``<path>.lora_B.weight``,
``<path>.base_layer.out_proj.lora_A.weight``, ``<path>.base_layer.out_proj.lora_B.weight``.

Merging adds ``s B A`` to each weight (exact, and undone by unmerging), like any linear LoRA.
Not available here (as in PEFT): DoRA, ``lora_bias``, PiSSA, separate q/k/v weights
(``kdim``/``vdim`` != ``embed_dim``) and mixed-adapter batches; ``lora_dropout`` is not applied (the
adapter acts through the weight, as in PEFT). bitsandbytes does not quantize attention modules, so
under ``strategy="qlora"`` their weights stay float.

``nn.TransformerEncoderLayer`` has an inference fast path that reads ``self_attn.in_proj_weight``
and calls a fused kernel, bypassing the module's forward. While an adapter is live this layer
reports ``_qkv_same_embed_dim = False``, which makes torch take the ordinary path.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.func import functional_call

from .base import AdapterModule
from .lora import LoraLayer, init_lora_factors, lora_scaling


def is_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


class LoraMHALayer(LoraLayer):
    """A frozen ``nn.MultiheadAttention`` with LoRA on ``in_proj`` (here) and ``out_proj`` (a
    :class:`LoraLayer` that replaces ``base_layer.out_proj``)."""

    mixes_rows = False

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        AdapterModule.__init__(self)
        if not is_mha(base_layer):
            raise TypeError(f"LoraMHALayer wraps nn.MultiheadAttention, not {type(base_layer).__name__}.")
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs one packed in_proj_weight (kdim == vdim == embed_dim), "
                             "as in PEFT; this one has separate q/k/v weights. Exclude it from target_modules.")
        self.base_layer = base_layer
        self.kind = "mha"
        self.weight_key = "in_proj_weight"
        self.quantized = False
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        self.transposed = False
        self._init_stores()

    @property
    def out_layer(self) -> LoraLayer:
        """The :class:`LoraLayer` on ``out_proj``."""
        return self.base_layer.out_proj

    def base_weight(self) -> torch.Tensor:
        """``in_proj_weight``, ``[3E, E]``."""
        return self.base_layer.in_proj_weight

    def set_base_weight(self, new_weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_layer.in_proj_weight.copy_(new_weight)

    @property
    def _qkv_same_embed_dim(self) -> bool:  # read by torch's TransformerEncoderLayer fast-path check
        out = self.base_layer.out_proj
        return self.base_layer._qkv_same_embed_dim and self._live_name(self) is None \
            and not (isinstance(out, LoraLayer) and self._live_name(out) is not None)

    # ------------------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    init_lora_weights: bool | str = True, lora_bias: bool = False) -> None:
        if name in self.scaling:
            raise ValueError(f"adapter {name!r} already exists on this layer; choose another adapter_name.")
        refused = [what for what, on in (("use_dora=True", use_dora), ("lora_bias=True", lora_bias),
                                         ("init_lora_weights='pissa'", init_lora_weights == "pissa")) if on]
        if refused:
            raise ValueError(f"{', '.join(refused)} is not available on nn.MultiheadAttention (as in PEFT); exclude the "
                             f"attention module from target_modules or drop the option.")
        weight = self.base_layer.in_proj_weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Identity()  # the adapter acts through the weight: no dropout (as PEFT)
        self.scaling[name] = lora_scaling(lora_alpha, r, use_rslora)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            init_lora_factors(A, B, init_lora_weights, r)
        base = self.base_layer
        if not isinstance(base.out_proj, LoraLayer):  # wrapped with the first adapter, unwrapped with the last
            base.out_proj = LoraLayer(base.out_proj)
        self.out_layer.add_adapter(name, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                                   init_lora_weights=init_lora_weights)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        base = self.base_layer
        if isinstance(base.out_proj, LoraLayer):  # (delete_adapter restores out_proj first, innermost first)
            if name in base.out_proj.adapter_names():
                base.out_proj.remove_adapter(name)
            if not base.out_proj.adapter_names():
                base.out_proj = base.out_proj.base_layer

    # ------------------------------------------------------------------------------- forward
    @staticmethod
    def _live_name(layer: LoraLayer) -> str | None:
        name = layer.active_adapter
        if layer.disabled or name is None or name not in layer.scaling or name in layer.merged:
            return None
        return name

    @staticmethod
    def _effective(layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        return torch.addmm(weight, B.to(weight.dtype), A.to(weight.dtype), alpha=layer.scaling[name])

    def forward(self, query: torch.Tensor, *args, **kwargs):
        if self.row_adapters is not None and not self.disabled:
            raise ValueError("mixed-adapter batches (adapter_ids) cannot run through nn.MultiheadAttention with LoRA: the "
                             "adapter changes the attention weights themselves, one set per batch. Run each adapter's "
                             "rows in a batch of their own (use_adapter).")
        weights = {}
        name = self._live_name(self)
        if name is not None:
            weights["in_proj_weight"] = self._effective(self, name, self.base_layer.in_proj_weight)
        out_layer = self.out_layer
        out_name = self._live_name(out_layer) if isinstance(out_layer, LoraLayer) else None
        if out_name is not None:
            weights["out_proj.base_layer.weight"] = self._effective(out_layer, out_name, out_layer.base_layer.weight)
        if not weights:
            return self.base_layer(query, *args, **kwargs)
        return functional_call(self.base_layer, weights, (query, *args), kwargs, strict=False)
