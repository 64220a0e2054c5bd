r"""Many adapters over one base: per-row adapters in a batch, combining adapters, hot swap.

``adapter_ids(model, ids)``: within the block, row ``n`` of every batch runs adapter ``ids[n]``
(``None`` = the base model), S-LoRA / Punica style: each LoRA layer gathers its stacked, rank-padded
``A`` and ``B`` per row and runs two batched matmuls (see :mod:`lightning_peft.methods.lora`).

``combine_adapters``: a new adapter from weighted ones, as HF PEFT's ``add_weighted_adapter``.
The new adapter has ``lora_alpha = r`` (scaling 1); with ``w_i`` the weights, ``s_i`` the scalings:

    cat     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]   r = sum r_i
            B A = sum_i w_i s_i B_i A_i                                  (exact)
    linear  A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i,  B = sum_i sqrt(|w_i s_i|) B_i   (same r)
            (cross terms B_i A_j remain: an approximation)
    svd     U S V^T = sum_i w_i s_i B_i A_i,  B = U_r S_r,  A = V_r^T     r = svd_rank or max r_i
            (exact when r >= rank of the sum, e.g. r = sum r_i)

``hot_swap_adapter``: copy another adapter directory's weights into an existing adapter's tensors
in place (same storage, no re-injection), so a compiled or captured model keeps running.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import WEIGHTS_NAME, _read_weights, adapter_tensors, check_tensors_fit, read_adapter_config
from .config import LoraConfig
from .inject import (
    CONFIGS_ATTR,
    _pattern_value,
    _refuse_if_merged,
    check_adapter_name,
    adapter_configs,
    adapter_modules,
    adapter_owner,
    inject_adapters,
)
from .methods import AdapterModule, LoraLayer, LoraParamLayer
from .methods.lora import lora_scaling
from .methods.mixed import _row_index, release_batch_memos

BASE = "__base__"  # HF PEFT's name for "no adapter" in adapter_names=; same as None here
METHODS = ("linear", "cat", "svd")


# ------------------------------------------------------------------------- mixed-adapter batches
def _row_names(model: nn.Module, ids: Sequence[str | None]) -> tuple[str | None, ...]:
    if isinstance(ids, str) or not isinstance(ids, Sequence) or len(ids) == 0:
        raise ValueError(f"adapter_ids expects a non-empty list with one adapter name (or None for the base "
                         f"model) per row of the batch, got {ids!r}.")
    names = tuple(None if i == BASE else i for i in ids)
    known = adapter_configs(model)
    unknown = sorted({str(n) for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"adapter_ids names adapters this model does not have: {unknown}; it has {list(known)} "
                         f"(None or {BASE!r} runs a row on the base model). Load them first with "
                         f"lightning_peft.load_adapter(model, directory, adapter_name=...).")
    return names


def _outer_adapter_modules(model: nn.Module) -> list[AdapterModule]:
    """The adapter modules of ``model``, without descending into them (their ``lora_A``/``lora_B``
    dicts hold most of a model's modules): this runs once per batch when serving."""
    found, pending = [], [model]
    while pending:
        module = pending.pop()
        if isinstance(module, AdapterModule):
            found.append(module)
        else:
            pending.extend(m for m in module._modules.values() if m is not None)
    return found


@contextmanager
def adapter_ids(model: nn.Module, ids: Sequence[str | None]):
    """Within the block, row ``n`` of each batch the model sees runs adapter ``ids[n]``.

    ``ids`` has one entry per row (the first dimension of the inputs): an adapter name, or
    ``None`` (or PEFT's ``"__base__"``) for the base model. Forward only or training alike; the
    active adapter and trainable flags are untouched and come back as they were on exit, also
    when the block raises. ``disable_adapters`` inside the block still turns every row to base.

    Only LoRA layers mix adapters per row: a module of another method (IA3, modules_to_save, ...)
    that holds one of the named adapters raises ``NotImplementedError``; one that holds none of
    them runs the base function for the block. Merged adapters are refused (unmerge first).
    """
    names = _row_names(model, ids)
    wanted = {n for n in names if n is not None}
    lora_layers, others = [], []
    for module in _outer_adapter_modules(model):
        if getattr(module, "merged", None):
            _refuse_if_merged(model, "run a mixed-adapter batch")
        if module.mixes_rows:
            lora_layers.append(module)
        else:  # a LoRA layer whose adapter acts through the whole weight (attention), or another method
            held = sorted(wanted.intersection(module.adapter_names()))
            if held:
                path = next(p for p, m in model.named_modules() if m is module)
                what = (f"{path} ({type(module.base_layer).__name__}) holds LoRA adapters {held} and cannot mix "
                        f"adapters per row: the adapter changes the module's weights for the whole batch"
                        if isinstance(module, LoraLayer) else
                        f"{path} ({type(module).__name__}, method {module.method!r}) holds adapters {held} and "
                        f"cannot mix adapters per row: only LoRA layers can")
                raise NotImplementedError(f"{what}. Run those rows in their own batch with "
                                          f"lightning_peft.use_adapter(model, name) instead.")
            others.append(module)
    # plain attributes, written to the instance dicts directly: nn.Module.__setattr__ (which checks
    # for parameters, modules and buffers) cost ~0.15 ms per batch over 28 layers, 0.6% of a forward
    previous = [(m.__dict__, "row_adapters", m.row_adapters) for m in lora_layers] + \
        [(m.__dict__, "row_slots", m.__dict__.get("row_slots")) for m in lora_layers] + \
        [(m.__dict__, "disabled", m.disabled) for m in others]
    slots: dict = {}  # (the layer's adapter names, device) -> each row's stack slot [N]: for torch.compile
    try:
        for module in lora_layers:
            module.__dict__["row_adapters"] = names
            key = (tuple(module.scaling), module.base_layer.weight.device)
            if key not in slots:
                slots[key] = _row_index(names, key[0], key[1])
            module.__dict__["row_slots"] = slots[key]
        for module in others:
            module.__dict__["disabled"] = True
        yield model
    finally:
        for attributes, key, old in previous:
            attributes[key] = old
        release_batch_memos()  # they reference this block's ids and its last sorted activation


def clear_adapter_caches(model: nn.Module) -> nn.Module:
    """Drop every LoRA layer's stacked adapters (built for mixed batches; rebuilt on the next one).

    Needed only after assigning an adapter tensor by hand (``param.data = t``, or a new
    ``nn.Parameter`` set on a ``lora_A``/``lora_B`` module): in-place updates, ``load_state_dict``,
    ``.to()``, hot swaps, merges and adding or deleting adapters are seen without it. Returns
    ``model``."""
    for module in _outer_adapter_modules(model):
        if module.mixes_rows:
            module.clear_stack_cache()
    return model


# ------------------------------------------------------------------------------------- combining
def _max_rank(config) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _combined_factors(layer: LoraLayer, names: list[str], weights: list[float], method: str,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A: [rank, in], B: [out, rank])`` in fp32 (or wider) for one layer; see module doc."""
    present = [(n, w) for n, w in zip(names, weights) if n in layer.scaling]
    if getattr(layer, "groups", 1) > 1:
        raise ValueError(f"combine_adapters: {type(layer.base_layer).__name__}(groups={layer.groups}) holds adapters "
                         f"{[n for n, _ in present]}; a grouped lora_B splits the rank by group, so factors of several "
                         f"adapters do not concatenate or add. Exclude grouped convolutions from the adapters to combine.")
    factors = [layer._factors(n) for n, _ in present]
    dtype = torch.promote_types(factors[0][0].dtype, torch.float32)
    # the factors' own widths: [r, in] for a linear layer, [r, in * prod(kernel)] for a convolution
    A_new = factors[0][0].new_zeros(rank, factors[0][0].shape[1], dtype=dtype)
    B_new = factors[0][0].new_zeros(factors[0][1].shape[0], rank, dtype=dtype)
    if method == "cat":
        A = torch.cat([w * layer.scaling[n] * A.to(dtype) for (n, w), (A, _) in zip(present, factors)])
        B = torch.cat([B.to(dtype) for _, B in factors], dim=1)
        A_new[:A.shape[0]], B_new[:, :B.shape[1]] = A, B
    elif method == "linear":
        shapes = {A.shape[0] for A, _ in factors}
        if shapes != {rank}:
            raise ValueError(f'method="linear" needs adapters of one rank in every layer; this layer has ranks '
                             f'{sorted(shapes)} (rank_pattern?). Use method="cat" or "svd".')
        for (n, w), (A, B) in zip(present, factors):
            ws = w * layer.scaling[n]
            root = abs(ws) ** 0.5
            A_new += (root if ws >= 0 else -root) * A.to(dtype)
            B_new += root * B.to(dtype)
    else:  # svd of the weighted sum of the deltas
        delta = sum(w * layer.delta_weight(n) for n, w in present)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        keep = min(rank, S.shape[0])
        A_new[:keep], B_new[:, :keep] = Vh[:keep], U[:, :keep] * S[:keep]
    return A_new, B_new


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], method: str = "cat",
                     new_name: str = "combined", svd_rank: int | None = None) -> nn.Module:
    """Add adapter ``new_name`` combining ``names`` with ``weights`` (see the module doc for the
    formulas; HF PEFT's ``add_weighted_adapter`` semantics). It targets every layer any of them
    targets, with ``lora_alpha = r``, no dropout change, plain LoRA. The active adapter and what
    trains are unchanged: ``set_adapter(model, new_name)`` to use it. Returns ``model``.

    ``"cat"`` is exact with rank ``sum r_i``; ``"svd"`` keeps the top ``svd_rank`` (default
    ``max r_i``) singular directions of the weighted sum; ``"linear"`` needs equal ranks. One
    adapter alone always combines linearly (as in PEFT).
    """
    check_adapter_name(new_name, "combine_adapters: new_name")
    configs = adapter_configs(model)
    names, weights = list(names), [float(w) for w in weights]
    unknown = [n for n in names if n not in configs]
    if not names or unknown:
        raise ValueError(f"combine_adapters: unknown adapters {unknown or names}; this model has {list(configs)}.")
    if len(weights) != len(names):
        raise ValueError(f"combine_adapters: {len(names)} adapters but {len(weights)} weights; give one weight each.")
    if method not in METHODS:
        raise ValueError(f"combine_adapters: method={method!r}; choose one of {list(METHODS)}.")
    if new_name in configs:
        raise ValueError(f"combine_adapters: an adapter named {new_name!r} exists already; pick another new_name.")
    for n in names:
        if not isinstance(configs[n], LoraConfig):
            raise TypeError(f"combine_adapters: adapter {n!r} is {type(configs[n]).__name__}, not LoRA; only LoRA "
                             f"adapters combine (their deltas s B A add up).")
        if configs[n].use_dora or configs[n].modules_to_save:
            raise ValueError(f"combine_adapters: adapter {n!r} uses DoRA or modules_to_save; only the low-rank "
                             f"LoRA parts combine (a DoRA magnitude or a trained module copy has no weighted sum). "
                             f"Merge such adapters one at a time with merge_adapters instead.")
        extras = [f for f in ("target_parameters", "trainable_token_indices", "lora_bias") if getattr(configs[n], f)]
        if extras:
            raise ValueError(f"combine_adapters: adapter {n!r} uses {', '.join(extras)}, which combine_adapters does not "
                             f"handle (only the s B A of layer adapters adds up). Merge such adapters one at a time "
                             f"with merge_adapters instead.")
    _refuse_if_merged(model, "combine adapters")
    method = "linear" if len(names) == 1 else method
    ranks = [_max_rank(configs[n]) for n in names]
    if method == "linear" and len(set(ranks)) != 1:
        raise ValueError(f'method="linear" needs adapters of one rank, got ranks {ranks}; use "cat" or "svd".')
    rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[method]

    owner = adapter_owner(model)
    layers = {p: m for p, m in adapter_modules(owner)
              if isinstance(m, LoraLayer) and any(n in m.scaling for n in names)}
    with torch.no_grad():  # everything computed before the model changes: an error leaves it as it was
        factors = {p: _combined_factors(m, names, weights, method, rank) for p, m in layers.items()}
    config = dataclasses.replace(configs[names[0]], r=rank, lora_alpha=rank, target_modules=sorted(layers),
                                 exclude_modules=None, rank_pattern={}, alpha_pattern={}, use_rslora=False,
                                 use_dora=False, modules_to_save=None, init_lora_weights=True)
    actives = [(m, m.active_adapter) for _, m in adapter_modules(owner)]
    trains = {p: p.requires_grad for p in model.parameters()}
    inject_adapters(owner, config, new_name)
    for module, active in actives:
        module.active_adapter = active
    for param in model.parameters():
        param.requires_grad_(trains.get(param, False))
    with torch.no_grad():
        for path, (A, B) in factors.items():
            A_new, B_new = layers[path]._factors(new_name)
            A_new.copy_(A)
            B_new.copy_(B)
    return model


# -------------------------------------------------------------------------------------- hot swap
def hot_swap_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                     allow_pickle: bool = False) -> nn.Module:
    """Replace the weights of the existing adapter ``adapter_name`` with those in ``directory``, in
    place: every tensor keeps its storage (``copy_``), nothing is injected or allocated, so a
    compiled / CUDA-graph-captured model keeps running with the new adapter.

    The directory must hold an adapter of the same keys and shapes (same targets and ranks);
    ``lora_alpha`` may differ (the layers' scalings are updated). Every key and shape is checked
    before anything changes: on a mismatch one ``ValueError`` lists the offending keys and the
    model is untouched. Returns ``model``.
    """
    check_adapter_name(adapter_name, "hot_swap_adapter: adapter_name")
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"hot_swap_adapter: no adapter named {adapter_name!r} to swap; this model has "
                         f"{list(configs)}. Load the first one with lightning_peft.load_adapter.")
    _refuse_if_merged(model, "hot-swap an adapter")
    directory = Path(directory)
    config = read_adapter_config(directory, type(configs[adapter_name]))
    old = configs[adapter_name]
    if (getattr(config, "init_lora_weights", None) == "pissa") != (getattr(old, "init_lora_weights", None) == "pissa"):
        raise ValueError(f"hot_swap_adapter: one of {adapter_name!r} and {directory} is a PiSSA adapter and the other "
                         f"is not; they need different base weights. Load it with load_adapter on a fresh model.")
    loaded = _read_weights(directory, allow_pickle)
    expected = adapter_tensors(model, adapter_name)
    check_tensors_fit(expected, loaded, str(directory / WEIGHTS_NAME),
                      fix=f"hot_swap_adapter copies into the tensors of adapter {adapter_name!r}, so the new adapter "
                          f"needs the same target modules and ranks. Load a different one beside it instead: "
                          f"lightning_peft.load_adapter(model, directory, adapter_name='other').")
    owner = adapter_owner(model)
    scalings = {}
    for path, layer in adapter_modules(owner):
        if isinstance(layer, (LoraLayer, LoraParamLayer)) and adapter_name in layer.scaling:
            r = (layer._factors(adapter_name)[0].shape[0] if isinstance(layer, LoraLayer)
                 else layer.lora_A[adapter_name].weight.shape[0] // layer.num_experts)
            alpha = _pattern_value(config.alpha_pattern, path, config.lora_alpha)
            scalings[layer] = lora_scaling(alpha, r, config.use_rslora)
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(loaded[key].to(dtype=tensor.dtype, device=tensor.device))
    for layer, scaling in scalings.items():
        layer.scaling[adapter_name] = scaling
        if isinstance(layer, LoraLayer):
            layer.clear_stack_cache()  # the copies bump version counters, except on inference tensors
    kept = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)
            if f.name in ("target_modules", "fan_in_fan_out", "target_parameters", "trainable_token_indices")}
    object.__setattr__(owner, CONFIGS_ATTR, {**configs, adapter_name: dataclasses.replace(config, **kept)})
    return model
