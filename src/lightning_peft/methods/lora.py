r"""LoRA, rsLoRA and DoRA as one adapter layer that wraps a frozen base layer.

For a base weight viewed as ``W: [out, in]`` and an input ``x: [..., in]``:

    LoRA     y = W x + b + s * B (A drop(x)),          A: [r, in], B: [out, r]
    scaling  s = alpha / r          (rsLoRA: s = alpha / sqrt(r))
    DoRA     y = m / ||W + s B A||_row * (W x + s B A drop(x)) + b,    m: [out]

The DoRA row norm is detached (treated as a constant, as in the DoRA paper), so its gradient
costs nothing. Dropout applies to the adapter branch only, and the base output ``W x + b`` is
computed once and reused: with dropout off this is exactly DoRA; with dropout on it avoids the
second base matmul that HF PEFT pays (docs/architecture.md, "Lightning's call order, and its traps"). The expand and the add are one
``addmm`` when the dtypes agree: in place into the base layer's fresh output under ``no_grad``,
unless a forward hook could hold that output (a hook on the base layer, or a global one: an
activation capture must see the base output, not the adapted one). In eager training over a float
``nn.Linear`` the whole layer, LoRA or DoRA, is one autograd node with a hand-written backward
(:mod:`lightning_peft.methods.fused`; docs/architecture.md, "The LoRA training step").

Three base layers are wrapped, all through the same ``[out, in]`` view of the weight:
``nn.Linear`` (stored ``[out, in]``), transformers' ``Conv1D`` (GPT-2, stored ``[in, out]``,
"fan_in_fan_out") and ``nn.Embedding`` (stored ``[num_embeddings, dim]``, viewed as
``[dim, num_embeddings]`` so that ``x`` is a one-hot row index). Tensor names follow HF PEFT
(``lora_A``/``lora_B`` modules, ``lora_embedding_A``/``lora_embedding_B`` and
``lora_magnitude_vector`` parameters) so that files and state dicts line up.

Mixed-adapter batches (``row_adapters`` set by :func:`lightning_peft.adapter_ids`: row ``n`` of
the batch runs adapter ``ids[n]``) are the job of :mod:`lightning_peft.methods.mixed`, which
this layer inherits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..quantize import requantize_
from .base import DROPOUT_TYPES, AdapterDropout, WeightLayer, base_kind  # noqa: F401 (names read from here too)
from .fused import FusedLoraLinear
from .mixed import MixedBatchMixin, release_batch_memos  # noqa: F401


LOSSY_MERGE_MESSAGE = (
    "refusing to merge into a quantized (4-bit/8-bit) base in place: re-quantizing W + dW rounds most of "
    "a small adapter update away (NF4 rounding error is ~10% of ||W||, a trained update ~0.5%), so the "
    "merged model can be worse than dropping the adapter. Use lightning_peft.export_merged(model, "
    "directory) to write a merged float model (dequantize -> merge in fp32 -> safetensors), or pass "
    "allow_lossy=True to merge anyway (a warning states the measured loss; it cannot be unmerged).")


def init_lora_factors(A: torch.Tensor, B: torch.Tensor, init: bool | str, r: int) -> None:
    """PEFT's initialisation of a LoRA pair, in place: ``A`` Kaiming-uniform (``N(0, 1/r)`` with
    ``init="gaussian"``), ``B`` zero so the adapter starts as the identity (random with
    ``init=False``: an "already trained" adapter, for tests and benchmarks)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (stable at high rank)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLayer(MixedBatchMixin, WeightLayer):
    """A base layer plus named LoRA/DoRA adapters; the base stays frozen and untouched.

    Build with ``LoraLayer(base_layer, fan_in_fan_out)``, add adapters with :meth:`add_adapter`.
    ``merged`` lists the adapters currently folded into the base weight (see
    :mod:`lightning_peft.merge`); those are skipped in ``forward``.
    """

    method = "lora"
    weight_key = "weight"  # the base layer's state-dict key of the weight base_weight() views
    adapter_stores = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout",
                      "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        kind = base_kind(base_layer)
        if kind is None:
            raise TypeError(f"LoRA wraps nn.Linear, transformers Conv1D or nn.Embedding, "
                            f"not {type(base_layer).__name__}.")
        self._view_base(base_layer, kind, fan_in_fan_out)
        self._init_stores()

    def _init_stores(self) -> None:
        """The per-adapter stores (``adapter_stores``) and mixed-batch state every LoRA layer kind
        holds; the kinds that wrap other layers (conv, attention) call it from their own ``__init__``."""
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dora_merge_norms: dict[str, torch.Tensor] = {}  # row norms at merge time, for unmerge
        self.row_adapters: tuple[str | None, ...] | None = None  # per-row adapter names (adapter_ids)
        self.row_slots: torch.Tensor | None = None  # the same as stack slots [N] (for torch.compile, see mixed.py)
        self._stack_cache: dict | None = None  # stacked adapters for mixed batches (see module doc)

    # ------------------------------------------------------------------------------ adapters
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        if self.kind == "embedding":
            state = {"lora_embedding_A": self.lora_embedding_A[name],
                     "lora_embedding_B": self.lora_embedding_B[name]}
        else:
            state = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
            if self.lora_B[name].bias is not None:  # lora_bias
                state["lora_B.bias"] = self.lora_B[name].bias
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        del self.scaling[name]
        self.clear_stack_cache()

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    init_lora_weights: bool | str = True, lora_bias: bool = False) -> None:
        """Create adapter ``name`` (rank ``r``) and initialise it; see :class:`LoraConfig`.
        ``lora_bias``: ``lora_B`` has a bias (zero unless ``init_lora_weights=False``)."""
        if name in self.scaling:
            raise ValueError(f"adapter {name!r} already exists on this layer; choose another adapter_name.")
        if lora_bias and (self.kind == "embedding" or use_dora):
            raise ValueError("lora_bias=True works on linear layers without DoRA (as in PEFT); exclude the embedding "
                             "(exclude_modules=[...]) or set use_dora=False.")
        out_features, in_features = self.out_features, self.in_features
        weight = self.base_layer.weight
        # adapters over a quantized base train in fp32 (as in QLoRA); else in the base's dtype
        factory = {"device": weight.device, "dtype": torch.float32 if self.quantized else weight.dtype}
        if self.quantized and init_lora_weights == "pissa":
            raise ValueError("PiSSA splits a float weight by SVD; this base is quantized. Initialise PiSSA on "
                             "the float model and quantize the residual, or use init_lora_weights=True.")
        if self.kind == "embedding":
            if init_lora_weights == "pissa":
                raise ValueError("PiSSA is not available for nn.Embedding layers; "
                                 "exclude the embedding from target_modules (exclude_modules=[...]).")
            self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, in_features, **factory))
            self.lora_embedding_B[name] = nn.Parameter(torch.empty(out_features, r, **factory))
        else:
            self.lora_A[name] = nn.Linear(in_features, r, bias=False, **factory)
            self.lora_B[name] = nn.Linear(r, out_features, bias=lora_bias, **factory)
        self.lora_dropout[name] = AdapterDropout(lora_dropout).to(factory["device"]) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_scaling(lora_alpha, r, use_rslora)
        self.clear_stack_cache()
        self._init_weights(name, init_lora_weights)
        if use_dora:
            with torch.no_grad():
                norm = self.dora_row_norm(name).to(factory["dtype"])
            self.lora_magnitude_vector[name] = nn.Parameter(norm)

    def _init_weights(self, name: str, init: bool | str) -> None:
        A, B = self._factors(name)
        with torch.no_grad():
            if init == "pissa":
                self._init_pissa(name)
            elif self.kind == "embedding":  # PEFT's convention for embeddings: A zero, B normal
                nn.init.zeros_(A) if init is not False else nn.init.normal_(A)
                nn.init.normal_(B)
            else:
                init_lora_factors(A, B, init, A.shape[0])
                bias = self.lora_B[name].bias
                if bias is not None and init is False:  # random B: the adapter is "already trained"
                    nn.init.uniform_(bias, -1 / math.sqrt(B.shape[1]), 1 / math.sqrt(B.shape[1]))
                elif bias is not None:
                    nn.init.zeros_(bias)

    def _init_pissa(self, name: str) -> None:
        """A, B from the top-r singular triplets of W; the base keeps the residual.

        With ``W = U S V^T``: ``s B A = U_r S_r V_r^T``, split evenly as ``B = U_r sqrt(S_r / s)`` and
        ``A = sqrt(S_r / s) V_r^T``; then ``W <- W - s B A``, so the model's function is unchanged.
        """
        A, B = self._factors(name)
        s = self.scaling[name]
        weight = self.base_weight()
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        r = A.shape[0]
        root = torch.sqrt(S[:r] / s)
        A.copy_(root[:, None] * Vh[:r])
        B.copy_(U[:, :r] * root[None, :])
        self.set_base_weight(weight.float() - s * (B.float() @ A.float()))

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: [r, in], B: [out, r])`` for adapter ``name``."""
        if self.kind == "embedding":
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` as ``[out, in]`` in at least fp32 (what a merge adds to the base)."""
        A, B = self._factors(name)
        dtype = torch.promote_types(A.dtype, torch.float32)
        return self.scaling[name] * (B.to(dtype) @ A.to(dtype))

    def dora_magnitude(self, name: str) -> torch.Tensor:
        """The DoRA magnitude of adapter ``name`` as ``[out]`` (layer kinds store other shapes)."""
        return self.lora_magnitude_vector[name]

    def stored_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the ``[out, in]`` view of :meth:`base_weight` back in the layout the base layer stores."""
        return weight.t() if self.transposed else weight

    def kind_refusal(self, name: str) -> str | None:
        """Why this kind of layer cannot hold adapter ``name`` in its weight (a grouped conv), or None."""
        return None

    def dora_row_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` over each output row, ``[out]``, fp32 or wider (not detached here)."""
        delta = self.delta_weight(name)
        return torch.linalg.vector_norm(self.base_weight().to(delta.dtype) + delta, dim=1)

    # ------------------------------------------------------------------------------- merging
    mergeable = True

    def merged_weight(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W', n)``: ``weight: [out, in]`` with adapter ``name`` folded in, in at least fp32,
        and the DoRA row norms ``n`` (None for LoRA); nothing changes.

            LoRA  W' = W + s B A            DoRA  W' = m / n * (W + s B A),  n = ||W + s B A||_row"""
        delta = self.delta_weight(name)
        merged = weight.to(delta.dtype) + delta
        if name not in self.lora_magnitude_vector:
            return merged, None
        norm = torch.linalg.vector_norm(merged, dim=1)
        return merged * (self.dora_magnitude(name).to(norm.dtype) / norm)[:, None], norm

    def _lora_bias(self, name: str) -> torch.Tensor | None:
        """``s * b_B`` of an adapter with a ``lora_B`` bias (``lora_bias``), fp32; else None."""
        if name in self.lora_B and self.lora_B[name].bias is not None:
            return self.scaling[name] * self.lora_B[name].bias.float()
        return None

    def merge_refusal(self, name: str, allow_lossy: bool = False) -> Exception | None:
        reason = self.kind_refusal(name)
        if reason:
            return RuntimeError(reason)
        if self.quantized and not allow_lossy:
            return RuntimeError(LOSSY_MERGE_MESSAGE)
        if self._lora_bias(name) is not None and getattr(self.base_layer, "bias", None) is None:
            return RuntimeError(f"adapter {name!r} has a lora_B bias (lora_bias=True) on a layer without a bias to fold "
                                f"it into ({type(self.base_layer).__name__}(bias=False)); keep the adapter unmerged "
                                f"(PEFT cannot merge it either).")
        return None

    def merge(self, name: str, allow_lossy: bool = False) -> float | None:
        """Fold adapter ``name`` into the base weight (see :meth:`merged_weight`).

        For a quantized base (only with ``allow_lossy``) returns the fraction of the adapter's weight
        update lost to re-quantization, ``||W_q' - W_q - dW|| / ||dW||``."""
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is already merged into this layer.")
        refusal = self.merge_refusal(name, allow_lossy)
        if refusal is not None:
            raise refusal
        with torch.no_grad():
            weight = self.base_weight()
            merged, norm = self.merged_weight(name, weight)
            lost = None
            if self.quantized:
                requantize_(self.base_layer, merged)
                update = merged - weight.to(merged.dtype)
                realised = self.base_weight().to(merged.dtype) - weight.to(merged.dtype)
                lost = ((realised - update).norm() / update.norm().clamp_min(1e-30)).item()
            else:
                self.set_base_weight(merged)
            self._add_lora_bias(name, +1)
            if norm is not None:
                self.dora_merge_norms[name] = norm
        self.merged.append(name)
        self.clear_stack_cache()  # a re-quantized base is a new tensor: no version bump to see
        return lost

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` back out of the base weight."""
        if name not in self.merged:
            raise RuntimeError(f"adapter {name!r} is not merged into this layer.")
        if self.quantized:
            raise RuntimeError(f"adapter {name!r} was merged lossily into a quantized weight and cannot be taken "
                               f"out again; reload the base model and the adapter (load_adapter).")
        with torch.no_grad():
            delta = self.delta_weight(name)
            weight = self.base_weight().to(delta.dtype)
            if name in self.lora_magnitude_vector:
                norm = self.dora_merge_norms.pop(name)
                weight = weight * (norm / self.dora_magnitude(name).to(norm.dtype))[:, None]
            self.set_base_weight(weight - delta)
            self._add_lora_bias(name, -1)
        self.merged.remove(name)
        self.clear_stack_cache()

    def _add_lora_bias(self, name: str, sign: int) -> None:
        """Base bias ``+= sign * s * b_B`` for an adapter with a lora_B bias (``lora_bias``)."""
        extra = self._lora_bias(name)
        if extra is not None:
            bias = self.base_layer.bias
            bias.copy_(bias.float() + sign * extra)

    def merged_state(self, name: str | None, base_state) -> dict[str, torch.Tensor]:
        weight = self.base_weight()
        bias = getattr(self.base_layer, "bias", None)
        if name in self.scaling and name not in self.merged:
            refusal = self.merge_refusal(name, allow_lossy=True)  # the kind's limits, a lora_B bias without a bias
            if refusal is not None:
                raise refusal
            weight, _ = self.merged_weight(name, weight)
            extra = self._lora_bias(name)
            if extra is not None:
                bias = bias.float() + extra
        if self.weight_key != "weight":  # a module with more than one weight (MultiheadAttention): the rest as is
            return {**base_state(self.base_layer), self.weight_key: self.stored_weight(weight)}
        state = {"weight": self.stored_weight(weight)}
        if bias is not None:
            state["bias"] = bias
        return state

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a mixed batch's ids as a tensor: one graph for every ids
            if self.row_slots is not None and not self.disabled:
                return self._traced_mixed_forward(x, *args, **kwargs)
        elif self.row_adapters is not None and not self.disabled:
            return self._mixed_forward(x, *args, **kwargs)
        elif not args and not kwargs and self._fusable(x):  # eager training: one autograd node
            name = self.active_adapter
            dropout = self.lora_dropout[name]
            scaling = self.scaling[name]
            if type(dropout) is AdapterDropout and dropout.active():
                scaling /= dropout.keep_probability()
            else:
                dropout = None
            base = self.base_layer
            dora = ()
            if name in self.lora_magnitude_vector:  # the row norms are constants (detached)
                with torch.no_grad():
                    dora = (self.lora_magnitude_vector[name], self.dora_row_norm(name))
            return FusedLoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                                         self.lora_B[name].weight, scaling, dropout, *dora)
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disabled or name is None or name not in self.scaling or name in self.merged:
            return result
        if self.kind == "embedding":
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            base = self.base_layer
            rows = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
            if name in self.lora_magnitude_vector:  # DoRA: m / ||W + s B A|| per embedding dimension
                return self._dora(result, rows @ B.t(), name, self.scaling[name])
            return torch.add(result, (rows @ B.t()).to(result.dtype), alpha=self.scaling[name])
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        scaling = self.scaling[name]
        dropout = self.lora_dropout[name]
        keep = 1.0  # the dropout's keep probability when its 1/q is left to fold into the scaling
        if type(dropout) is AdapterDropout:
            if dropout.active():  # x * mask, unscaled: 1/q joins the scaling (one pass over x fewer)
                x = dropout.drop(x)
                keep = dropout.keep_probability()
        else:  # nn.Identity, or a dropout module the user swapped in
            x = dropout(x)
        shrunk = F.linear(x.to(A.dtype), A)
        if name in self.lora_magnitude_vector:
            return self._dora(result, F.linear(shrunk, B), name, scaling / keep)
        if self.lora_B[name].bias is not None:  # lora_bias: s * (B shrunk / q + b_B)
            if keep != 1.0:
                shrunk = shrunk / keep
            return torch.add(result, F.linear(shrunk, B, self.lora_B[name].bias).to(result.dtype), alpha=scaling)
        scaling = scaling / keep
        if not result.dtype == shrunk.dtype == B.dtype:  # autocast, or fp32 adapters over a bf16 4-bit base
            return torch.add(result, F.linear(shrunk, B).to(result.dtype), alpha=scaling)
        # y = result + s * shrunk @ B^T as one addmm: no separate [tokens, out] product and add pass
        flat, shrunk = result.reshape(-1, self.out_features), shrunk.reshape(-1, shrunk.shape[-1])
        if self._may_write_base_output():  # inference: accumulate into the base layer's fresh output
            return flat.addmm_(shrunk, B.t(), alpha=scaling).view(result.shape)
        return torch.addmm(flat, shrunk, B.t(), alpha=scaling).view(result.shape)

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether this eager call may run as :class:`~lightning_peft.methods.fused.FusedLoraLinear`:
        a gradient is wanted, and the fused node computes exactly the plain path (see its module)."""
        name = self.active_adapter
        if (not torch.is_grad_enabled() or self.disabled or name is None or name not in self.scaling
                or name in self.merged or self.kind != "linear" or self.transposed or self.quantized
                or type(self.base_layer) is not nn.Linear):
            return False
        A, B = self.lora_A[name], self.lora_B[name]
        weight, bias = self.base_layer.weight, self.base_layer.bias
        dropout = type(self.lora_dropout[name])
        magnitude = self.lora_magnitude_vector[name] if name in self.lora_magnitude_vector else A.weight
        return (B.bias is None and (dropout is nn.Identity or dropout is AdapterDropout)
                and magnitude.dtype == A.weight.dtype
                and not weight.requires_grad and (bias is None or not bias.requires_grad)
                and (x.requires_grad or A.weight.requires_grad or B.weight.requires_grad or magnitude.requires_grad)
                and x.dtype == weight.dtype == A.weight.dtype == B.weight.dtype
                and x.device.type in ("cpu", "cuda") and not torch.is_autocast_enabled(x.device.type)
                and not self._base_hooked())

    def _base_hooked(self) -> bool:
        """Whether a forward (pre-)hook sees the base layer's inputs or outputs: on it, or global."""
        base = self._modules["base_layer"]
        return bool(base._forward_hooks or base._forward_pre_hooks or _global_forward_hooks
                    or _global_forward_pre_hooks)

    def _may_write_base_output(self) -> bool:
        """Whether the base layer's output may be overwritten in place: not when autograd may need it,
        nor when a hook may have kept a reference to it."""
        return not (torch.is_grad_enabled() or self._base_hooked())

    def _dora(self, result: torch.Tensor, lora: torch.Tensor, name: str, scaling: float) -> torch.Tensor:
        """``m / ||W + s B A|| * ((W x + b) - b + scaling * lora) + b``, reusing the base output
        (``scaling``: ``s``, or ``s / q`` when ``lora`` came from a dropped-out, unscaled input)."""
        with torch.no_grad():
            norm = self.dora_row_norm(name)
        magnitude = self.lora_magnitude_vector[name]
        scale = (magnitude / norm.to(magnitude.dtype)).to(result.dtype)
        bias = getattr(self.base_layer, "bias", None)
        out = result if bias is None else result - bias
        out = torch.add(out, lora.to(result.dtype), alpha=scaling) * scale
        return out if bias is None else out + bias
