r"""LoRA, rsLoRA and DoRA as one adapter layer that wraps a frozen base layer.

For a base weight viewed as ``W: [out, in]`` and an input ``x: [..., in]``:

    LoRA     y = W x + b + s * B (A drop(x)),          A: [r, in], B: [out, r]
    scaling  s = alpha / r          (rsLoRA: s = alpha / sqrt(r))
    DoRA     y = m / ||W + s B A||_row * (W x + s B A drop(x)) + b,    m: [out]

The DoRA row norm is detached (treated as a constant, as in the DoRA paper), so its gradient
costs nothing. Dropout applies to the adapter branch only, and the base output ``W x + b`` is
computed once and reused: with dropout off this is exactly DoRA; with dropout on it avoids the
second base matmul that HF PEFT pays (DESIGN.md section 3). The expand and the add are one
``addmm`` when the dtypes agree: in place into the base layer's fresh output under ``no_grad``,
unless a forward hook could hold that output (a hook on the base layer, or a global one: an
activation capture must see the base output, not the adapted one).

Three base layers are wrapped, all through the same ``[out, in]`` view of the weight:
``nn.Linear`` (stored ``[out, in]``), transformers' ``Conv1D`` (GPT-2, stored ``[in, out]``,
"fan_in_fan_out") and ``nn.Embedding`` (stored ``[num_embeddings, dim]``, viewed as
``[dim, num_embeddings]`` so that ``x`` is a one-hot row index). Tensor names follow HF PEFT
(``lora_A``/``lora_B`` modules, ``lora_embedding_A``/``lora_embedding_B`` and
``lora_magnitude_vector`` parameters) so that files and state dicts line up.

Mixed-adapter batches (``row_adapters`` set by :func:`lightning_peft.adapter_ids`): row ``n`` of
the batch runs adapter ``ids[n]`` (or none). The layer's K adapters are stacked once, rank
zero-padded to ``R = max r`` (a zero row of A and column of B add nothing), slot 0 all zeros
for the base, scaling folded into B:

    A*: [K+1, in, R]   (A_k^T)        B*: [K+1, R, out]   (s_k B_k^T)
    y_n = W x_n + b + (x_n A*[k_n]) B*[k_n]        x_n: [T, in], two batched matmuls (bmm)
    DoRA rows: y_n = m_k / ||W + s_k B_k A_k||_row * (W x_n + (x_n A*) B*) + b

Rows of T >= R tokens gather a copy of A*[k_n] and B*[k_n] per row (``index_select``, then
``bmm`` over rows). Shorter rows (decoding) would copy more weights than activations, so they
are sorted into one group per slot instead, padded to equal size with repeated rows (at most
1/8 of the batch, else the per-row path): the base layer runs on the sorted rows, the ``bmm``
runs over groups on views of the stack, and the output rows are put back in order. Not with
DoRA rows, extra base-layer arguments, or hooks on the base layer (they would see sorted rows).

The stack is cached. On every call the cache is checked against the ``_version`` of each
tensor it was built from (kept in a list beside it) and the scalings: an in-place update by an
optimizer, ``load_state_dict``, ``copy_`` or a hot swap bumps ``_version`` and the stack is
rebuilt. What replaces tensors instead of updating them drops the cache
(:meth:`LoraLayer.clear_stack_cache`): ``.to()``/``.half()``/``.cuda()`` (``_apply``),
``load_state_dict`` (also with ``assign=True``), adding or deleting an adapter, merging and
unmerging. Only assigning a tensor by hand (``param.data = t`` or ``lora_B[name].weight =
Parameter(t)``) goes unseen, and an in-place edit of an adapter built under
``torch.inference_mode`` (its tensors have no version counter): call ``clear_stack_cache()`` (or
:func:`lightning_peft.clear_adapter_caches`) after that. The check reads only version counters:
re-walking the module dicts and reading data pointers touched ~100 cold Python and storage
objects per layer, ~1 ms (4%) of a 16-token forward in benchmarks/multi_adapter.py. When
autograd needs the adapter tensors (training through a mixed batch) the stack is built fresh,
differentiably, and the cache is dropped: the next no-grad batch restacks whatever the
optimizer (or anything else) did to the tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..quantize import dequantize_weight, is_quantized
from .base import AdapterModule

# the last per-row slot index built for a mixed batch: (ids, the layer's adapter names in slot order,
# device, index [N]). Every layer holding the same adapters in the same order reuses it, so a batch
# builds (and on a GPU uploads) its index once rather than once per layer.
_LAST_ROW_INDEX: tuple = (None, None, None, None)
# the same for the row grouping of short rows (see LoraLayer._grouped_forward): (ids, names, device, groups)
_LAST_ROW_GROUPS: tuple = (None, None, None, None)
# how many padding rows (of the batch's rows) a grouping may add before the per-row path is used instead
_MAX_PAD_FRACTION = 1 / 8
# the last input sorted for a grouped forward: (x, x._version, perm, sorted x). Layers fed the same
# tensor (q/k/v, gate/up) sort it once. One tuple, read once: a consistent snapshot across threads.
_LAST_SORTED: tuple = (None, None, None, None)


def release_batch_memos() -> None:
    """Drop the memos a mixed batch leaves behind (row index, grouping, the last sorted input, which
    holds an activation); :func:`lightning_peft.adapter_ids` calls this when its block ends."""
    global _LAST_ROW_INDEX, _LAST_ROW_GROUPS, _LAST_SORTED
    _LAST_ROW_INDEX = _LAST_ROW_GROUPS = _LAST_SORTED = (None, None, None, None)


def _row_slot_list(ids, names: tuple) -> list[int]:
    """Each row's slot in a stack of ``names``: 1 + the adapter's position, 0 for the base (also
    for an adapter this layer does not hold)."""
    slot_of = {n: i + 1 for i, n in enumerate(names)}
    return [slot_of.get(name, 0) for name in ids]


def _row_index(ids, names: tuple, device: torch.device) -> torch.Tensor:
    """:func:`_row_slot_list` as a ``[N]`` index tensor."""
    return torch.tensor(_row_slot_list(ids, names), dtype=torch.long, device=device)


def _group_rows(ids, names: tuple, device: torch.device):
    """``(perm [G*m], inv [N], slots, G)`` to run a batch as G groups of m rows, one group per
    slot (adapter, or 0 for base), slots ascending; short groups are padded by repeating their first
    row (computed, never read back). ``slots`` is a slice when the slots are consecutive (the stack
    is then used as a view), else an index tensor. None when the padding would exceed
    ``_MAX_PAD_FRACTION`` of the rows."""
    members: dict[int, list[int]] = {}
    for row, slot in enumerate(_row_slot_list(ids, names)):
        members.setdefault(slot, []).append(row)
    order = sorted(members)
    rows, m = len(ids), max(len(group) for group in members.values())
    if len(order) * m - rows > rows * _MAX_PAD_FRACTION:
        return None
    perm, inv = [], [0] * rows
    for slot in order:
        group = members[slot]
        for row in group:
            inv[row] = len(perm)
            perm.append(row)
        perm.extend([group[0]] * (m - len(group)))
    consecutive = order == list(range(order[0], order[-1] + 1))
    slots = slice(order[0], order[-1] + 1) if consecutive else torch.tensor(order, device=device)
    return torch.tensor(perm, device=device), torch.tensor(inv, device=device), slots, len(order)


def _per_batch(last: tuple, ids, names: tuple, device: torch.device, build) -> tuple[tuple, object]:
    """``(memo, value)``: the value memoised in ``last`` when it was built for this very ids object
    (one per adapter_ids block), these adapter names and this device, else ``build(ids, names,
    device)`` and its new memo. Lets every layer holding the same adapters share one build per batch."""
    if last[0] is ids and last[1] == names and last[2] == device:
        return last, last[3]
    value = build(ids, names, device)
    return (ids, names, device, value), value


def _versions(tensors: list[torch.Tensor]) -> list[int | None]:
    """Their version counters; None for an inference tensor (made under ``torch.inference_mode``),
    which has none: an in-place edit of one, possible only inside inference mode, goes unseen."""
    return [None if t.is_inference() else t._version for t in tensors]


def base_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or ``"embedding"`` for layers LoRA can wrap, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"  # transformers.pytorch_utils.Conv1D, duck-typed: no import of transformers
    return None


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (stable at high rank)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class AdapterDropout(nn.Module):
    """Inverted dropout, ``x * keep / (1 - p)`` with ``keep = rand >= p``.

    The same distribution as ``nn.Dropout``, but the mask comes from a uniform draw and a compare
    instead of ``bernoulli_``, which is slower on CPU (dropout masks were ~20% of a LoRA step in
    benchmarks/lora_step.py); autograd keeps a 1-byte bool mask.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:  # p is set to 0 by alignment.disable_dropout
            return x
        return (x * (torch.rand_like(x) >= self.p)).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


# every dropout module kind: torch's (nn.Dropout, Dropout1d/2d/3d, AlphaDropout) and the adapters'
DROPOUT_TYPES = (nn.modules.dropout._DropoutNd, AdapterDropout)


class LoraLayer(AdapterModule):
    """A base layer plus named LoRA/DoRA adapters; the base stays frozen and untouched.

    Build with ``LoraLayer(base_layer, fan_in_fan_out)``, add adapters with :meth:`add_adapter`.
    ``merged`` lists the adapters currently folded into the base weight (see
    :mod:`lightning_peft.merge`); those are skipped in ``forward``.
    """

    method = "lora"
    adapter_stores = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout",
                      "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        kind = base_kind(base_layer)
        if kind is None:
            raise TypeError(f"LoRA wraps nn.Linear, transformers Conv1D or nn.Embedding, "
                            f"not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.kind = kind
        self.quantized = is_quantized(base_layer)
        if kind == "linear":
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        else:  # Conv1D stores [in, out]; an embedding is a linear map from one-hot [num] to [dim]
            self.in_features, self.out_features = base_layer.weight.shape
        # the stored weight is [in, out] (Conv1D, Embedding, or a Linear flagged fan_in_fan_out)
        self.transposed = kind != "linear" or fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.merged: list[str] = []
        self.dora_merge_norms: dict[str, torch.Tensor] = {}  # row norms at merge time, for unmerge
        self.row_adapters: tuple[str | None, ...] | None = None  # per-row adapter names (adapter_ids)
        self._stack_cache: dict | None = None  # stacked adapters for mixed batches (see module doc)

    # ------------------------------------------------------------------------------- weights
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
            if use_dora or init_lora_weights == "pissa":
                raise ValueError("DoRA and PiSSA are not available for nn.Embedding layers; "
                                 "exclude the embedding from target_modules (exclude_modules=[...]).")
            self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, in_features, **factory))
            self.lora_embedding_B[name] = nn.Parameter(torch.empty(out_features, r, **factory))
        else:
            self.lora_A[name] = nn.Linear(in_features, r, bias=False, **factory)
            self.lora_B[name] = nn.Linear(r, out_features, bias=lora_bias, **factory)
        self.lora_dropout[name] = AdapterDropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
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
                if init == "gaussian":
                    nn.init.normal_(A, std=1.0 / A.shape[0])
                else:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                bias = self.lora_B[name].bias
                if init is False:  # random B: the adapter is "already trained" (tests, benchmarks)
                    nn.init.kaiming_uniform_(B, a=math.sqrt(5))
                    if bias is not None:
                        nn.init.uniform_(bias, -1 / math.sqrt(B.shape[1]), 1 / math.sqrt(B.shape[1]))
                else:
                    nn.init.zeros_(B)
                    if bias is not None:
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

    def dora_row_norm(self, name: str) -> torch.Tensor:
        """``||W + s B A||`` over each output row, ``[out]``, fp32 or wider (not detached here)."""
        delta = self.delta_weight(name)
        return torch.linalg.vector_norm(self.base_weight().to(delta.dtype) + delta, dim=1)

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None and not self.disabled:
            return self._mixed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disabled or name is None or name not in self.scaling or name in self.merged:
            return result
        if self.kind == "embedding":
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            base = self.base_layer
            rows = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
            return torch.add(result, (rows @ B.t()).to(result.dtype), alpha=self.scaling[name])
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        shrunk = F.linear(self.lora_dropout[name](x).to(A.dtype), A)
        if name in self.lora_magnitude_vector:
            return self._dora(result, F.linear(shrunk, B), name)
        if self.lora_B[name].bias is not None:  # lora_bias: s * (B shrunk + b_B)
            return torch.add(result, F.linear(shrunk, B, self.lora_B[name].bias).to(result.dtype),
                             alpha=self.scaling[name])
        if not result.dtype == shrunk.dtype == B.dtype:  # autocast, or fp32 adapters over a bf16 4-bit base
            return torch.add(result, F.linear(shrunk, B).to(result.dtype), alpha=self.scaling[name])
        # y = result + s * shrunk @ B^T as one addmm: no separate [tokens, out] product and add pass
        flat, shrunk = result.reshape(-1, self.out_features), shrunk.reshape(-1, shrunk.shape[-1])
        if self._may_write_base_output():  # inference: accumulate into the base layer's fresh output
            return flat.addmm_(shrunk, B.t(), alpha=self.scaling[name]).view(result.shape)
        return torch.addmm(flat, shrunk, B.t(), alpha=self.scaling[name]).view(result.shape)

    def _base_hooked(self) -> bool:
        """Whether a forward (pre-)hook sees the base layer's inputs or outputs: on it, or global."""
        base = self._modules["base_layer"]
        return bool(base._forward_hooks or base._forward_pre_hooks or _global_forward_hooks
                    or _global_forward_pre_hooks)

    def _may_write_base_output(self) -> bool:
        """Whether the base layer's output may be overwritten in place: not when autograd may need it,
        nor when a hook may have kept a reference to it."""
        return not (torch.is_grad_enabled() or self._base_hooked())

    def _dora(self, result: torch.Tensor, lora: torch.Tensor, name: str) -> torch.Tensor:
        """``m / ||W + s B A|| * ((W x + b) - b + s * lora) + b``, reusing the base output."""
        with torch.no_grad():
            norm = self.dora_row_norm(name)
        magnitude = self.lora_magnitude_vector[name]
        scale = (magnitude / norm.to(magnitude.dtype)).to(result.dtype)
        bias = getattr(self.base_layer, "bias", None)
        out = result if bias is None else result - bias
        out = torch.add(out, lora.to(result.dtype), alpha=self.scaling[name]) * scale
        return out if bias is None else out + bias

    # -------------------------------------------------------------------- mixed-adapter batches
    def _stack_sources(self) -> list[torch.Tensor]:
        """Every tensor the stacked adapters are computed from (the base weight only for DoRA).

        Read from the containers' ``_parameters`` directly: this runs on every mixed forward, and
        ``nn.Module`` attribute lookups cost about a microsecond each."""
        if self.kind == "embedding":
            tensors = [*self.lora_embedding_A._parameters.values(), *self.lora_embedding_B._parameters.values()]
        else:
            tensors = [m._parameters["weight"] for store in (self.lora_A, self.lora_B) for m in store._modules.values()]
        magnitudes = self.lora_magnitude_vector._parameters
        if magnitudes:
            tensors += [*magnitudes.values(), self.base_layer.weight]
        return tensors

    def _build_stack(self) -> dict:
        """``A*: [K+1, in, R]``, ``B*: [K+1, R, out]`` (scaled), DoRA row scales ``[K+1, out]``,
        dropout probabilities ``[K+1]`` and ``{name: slot}``; slot 0 is the base (all zeros)."""
        names = list(self.scaling)
        factors = [self._factors(n) for n in names]
        A0, _ = factors[0]
        rank = max(A.shape[0] for A, _ in factors)
        zeros_a = A0.new_zeros(self.in_features, rank)
        zeros_b = A0.new_zeros(rank, self.out_features)
        A_stack = torch.stack([zeros_a] + [F.pad(A.t(), (0, rank - A.shape[0])) for A, _ in factors])
        B_stack = torch.stack([zeros_b] + [F.pad(B.t() * self.scaling[n], (0, 0, 0, rank - B.shape[1]))
                                           for n, (_, B) in zip(names, factors)])
        dora = None
        if self.lora_magnitude_vector:
            ones = A0.new_ones(self.out_features)
            rows = []
            for n in names:
                if n not in self.lora_magnitude_vector:
                    rows.append(ones)
                    continue
                with torch.no_grad():  # detached, as in the single-adapter forward
                    norm = self.dora_row_norm(n)
                magnitude = self.lora_magnitude_vector[n]
                rows.append(magnitude / norm.to(magnitude.dtype))
            dora = torch.stack([ones] + rows)
        probs = [0.0] + [getattr(self.lora_dropout[n], "p", 0.0) for n in names]
        return {"names": tuple(names), "A": A_stack, "B": B_stack,
                "dora": dora, "dora_names": {n for n in names if n in self.lora_magnitude_vector},
                "p": torch.tensor(probs, dtype=A0.dtype, device=A0.device) if any(probs) else None, "rows": None,
                "groups": None}

    def _stack(self) -> dict:
        """The stacked adapters: cached unless autograd needs them (then built fresh each call);
        the cache is checked by version counters only (see the module doc)."""
        cache = self._stack_cache
        sources = self._stack_sources() if cache is None else cache["sources"]
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            self._stack_cache = None  # training: the tensors are about to change, however that happens
            return self._build_stack()
        if cache is not None:
            versions = [t._version for t in sources] if cache["counted"] else _versions(sources)
            if cache["scaling"] == self.scaling and versions == cache["versions"]:
                return cache
            sources = self._stack_sources()  # rebuild from the module's current tensors
        with torch.no_grad():
            cache = self._build_stack()
        versions = _versions(sources)
        cache.update(sources=sources, versions=versions, counted=None not in versions, scaling=dict(self.scaling))
        self._stack_cache = cache
        return cache

    def clear_stack_cache(self) -> None:
        """Drop the stacked adapters of mixed batches; the next mixed batch rebuilds them."""
        self._stack_cache = None

    def _apply(self, fn, recurse=True):
        self.clear_stack_cache()  # .to() / .half() / .cuda() replace the tensors the stack came from
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.clear_stack_cache()  # load_state_dict(assign=True) replaces tensors rather than copying
        super()._load_from_state_dict(*args, **kwargs)

    def _row_slots(self, stack: dict, device: torch.device) -> tuple[torch.Tensor, bool]:
        """``(slot index per row [N], whether a row runs DoRA)``; memoised per ids tuple, and the
        index shared with the other layers of the batch (``_LAST_ROW_INDEX``)."""
        global _LAST_ROW_INDEX
        ids = self.row_adapters
        if stack["rows"] is not None and stack["rows"][0] is ids and stack["rows"][1].device == device:
            return stack["rows"][1], stack["rows"][2]
        _LAST_ROW_INDEX, index = _per_batch(_LAST_ROW_INDEX, ids, stack["names"], device, _row_index)
        uses_dora = not stack["dora_names"].isdisjoint(ids)
        stack["rows"] = (ids, index, uses_dora)
        return index, uses_dora

    def _row_groups(self, stack: dict, device: torch.device):
        """:func:`_group_rows` for this batch (None if a row runs DoRA); memoised per ids like
        :meth:`_row_slots`, and shared with the other layers (``_LAST_ROW_GROUPS``)."""
        global _LAST_ROW_GROUPS
        ids = self.row_adapters
        memo = stack["groups"]
        if memo is not None and memo[0] is ids and memo[2] == device:
            return memo[1]
        _LAST_ROW_GROUPS, groups = _per_batch(_LAST_ROW_GROUPS, ids, stack["names"], device, _group_rows)
        if groups is not None and stack["dora_names"].isdisjoint(ids):
            perm, inv, slots, count = groups
            take = (lambda t: t[slots]) if isinstance(slots, slice) else (lambda t: t.index_select(0, slots))
            p = None if stack["p"] is None else take(stack["p"]).view(count, 1, 1)
            groups = (perm, inv, take(stack["A"]), take(stack["B"]), p)  # views of the stack when slots are consecutive
        else:
            groups = None
        stack["groups"] = (ids, groups, device)
        return groups

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Row ``n`` of ``x: [N, ..., in]`` through adapter ``row_adapters[n]``; see module doc."""
        rows = len(self.row_adapters)
        if not self.scaling:
            return self.base_layer(x, *args, **kwargs)
        if x.shape[0] != rows:
            raise ValueError(f"adapter_ids gave {rows} ids, but this layer got a batch of {x.shape[0]} rows "
                             f"(input {tuple(x.shape)}); give one id per row of the batch (with beam search or "
                             f"num_return_sequences, repeat each id for every copy of its row).")
        biased = sorted({n for n in self.row_adapters if n in self.lora_B and self.lora_B[n].bias is not None})
        if biased:
            raise ValueError(f"adapters {biased} have a lora_B bias (lora_bias=True), which mixed-adapter batches do not "
                             f"support; run their rows in a batch of their own (use_adapter).")
        stack = self._stack()
        A_stack, B_stack = stack["A"], stack["B"]
        # short rows (fewer tokens than the stacked rank: decoding, short requests) run grouped by
        # adapter, which moves their activations instead of per-row copies of the weights
        if (x.numel() < rows * self.in_features * A_stack.shape[-1] and self.kind != "embedding"
                and not (args or kwargs or self._base_hooked())):
            groups = self._row_groups(stack, x.device)
            if groups is not None:
                return self._grouped_forward(x, stack, groups)
        index, uses_dora = self._row_slots(stack, x.device)
        result = self.base_layer(x, *args, **kwargs)
        if self.kind == "embedding":
            shrunk = A_stack[index.view(-1, *[1] * (x.dim() - 1)), x].reshape(rows, -1, A_stack.shape[-1])
        else:
            h = x.to(A_stack.dtype)
            if self.training and stack["p"] is not None:  # inverted dropout with each row's own p
                p = stack["p"][index].view(-1, *[1] * (x.dim() - 1))
                h = h * (torch.rand_like(h) >= p) / (1.0 - p)
            # index_select: a plain row copy, ~4x faster on CPU than advanced indexing A_stack[index]
            shrunk = torch.bmm(h.reshape(rows, -1, self.in_features), A_stack.index_select(0, index))
        B_rows = B_stack.index_select(0, index)
        if not uses_dora and result.dtype == shrunk.dtype == B_rows.dtype:  # y = result + shrunk @ B, one pass
            flat = result.reshape(rows, -1, self.out_features)
            if self._may_write_base_output():  # saves a copy of the whole output (~4% at 16 tokens per row)
                return flat.baddbmm_(shrunk, B_rows).view(result.shape)
            return torch.baddbmm(flat, shrunk, B_rows).view(result.shape)
        lora = torch.bmm(shrunk, B_rows).view(result.shape).to(result.dtype)
        if not uses_dora:
            return result + lora
        scale = stack["dora"][index].to(result.dtype).view(rows, *[1] * (result.dim() - 2), -1)
        bias = getattr(self.base_layer, "bias", None)
        out = result if bias is None else result - bias
        out = (out + lora) * scale
        return out if bias is None else out + bias

    def _grouped_forward(self, x: torch.Tensor, stack: dict, groups: tuple) -> torch.Tensor:
        """The batch's rows sorted into G equal groups of m rows, one adapter slot per group (see
        :func:`_group_rows`): the base layer runs on the sorted rows, the adapters as two ``bmm``
        over views of the stack (no per-row weight copies), and the output rows are put back in
        order. Only without DoRA rows, extra base-layer arguments or hooks on the base layer
        (they would see the sorted rows). Layers fed the same input tensor sort it once (not under
        ``torch.inference_mode``, whose tensors have no version counter to check that memo by)."""
        global _LAST_SORTED
        perm, inv, A, B, p = groups
        if x.is_inference():  # no version counter to check a memo against (torch.inference_mode)
            xs = x.index_select(0, perm)
        else:
            last = _LAST_SORTED
            if last[0] is x and last[2] is perm and last[1] == x._version:
                xs = last[3]
            else:
                xs = x.index_select(0, perm)
                _LAST_SORTED = (x, x._version, perm, xs)
        out = self._modules["base_layer"](xs)  # a fresh tensor no hook has seen
        h = xs.to(A.dtype).reshape(A.shape[0], -1, self.in_features)
        if p is not None and self.training:  # inverted dropout with each group's own p
            h = h * (torch.rand_like(h) >= p) / (1.0 - p)
        shrunk = torch.bmm(h, A)
        flat = out.reshape(A.shape[0], -1, self.out_features)
        if out.dtype == shrunk.dtype == B.dtype:
            flat = torch.baddbmm(flat, shrunk, B) if torch.is_grad_enabled() else flat.baddbmm_(shrunk, B)
        else:
            flat = flat + torch.bmm(shrunk, B).to(out.dtype)
        return flat.view(out.shape).index_select(0, inv)
