r"""Fold adapters into the base weights and take them out again (float bases: exact up to fp32).

    LoRA   merge:  W <- W + s B A                 unmerge: W <- W - s B A
    DoRA   merge:  W <- m / n * (W + s B A),  n = ||W + s B A||_row (kept for unmerge)
           unmerge: W <- W * n / m - s B A

Arithmetic runs in fp32 (or the base's wider dtype) and is cast back once. A merged adapter is
skipped in ``forward`` (its effect is in the weight), so the merged model computes the same
function with one matmul per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .inject import adapter_configs, adapter_modules
from .methods import LoraLayer


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for _, m in adapter_modules(model) if isinstance(m, LoraLayer)]


def _resolve(model: nn.Module, adapter_name: str | None) -> str:
    configs = adapter_configs(model)
    layers = _lora_layers(model)
    name = adapter_name if adapter_name is not None else (layers[0].active_adapter if layers else None)
    if name not in configs:
        raise ValueError(f"no adapter {name!r} to merge; this model has {list(configs)}.")
    return name


def merge_layer(layer: LoraLayer, name: str) -> None:
    """Fold adapter ``name`` of one layer into its base weight."""
    if name in layer.merged:
        raise RuntimeError(f"adapter {name!r} is already merged into this layer.")
    weight = layer.base_weight()
    if not weight.is_floating_point():
        raise TypeError("merge_layer needs a float base weight; quantized bases are merged by export_merged.")
    with torch.no_grad():
        delta = layer.delta_weight(name)
        merged = weight.to(delta.dtype) + delta
        if name in layer.lora_magnitude_vector:
            norm = torch.linalg.vector_norm(merged, dim=1)
            layer.dora_merge_norms[name] = norm
            merged = merged * (layer.lora_magnitude_vector[name].to(norm.dtype) / norm)[:, None]
        layer.set_base_weight(merged)
    layer.merged.append(name)


def unmerge_layer(layer: LoraLayer, name: str) -> None:
    """Take adapter ``name`` back out of one layer's base weight."""
    if name not in layer.merged:
        raise RuntimeError(f"adapter {name!r} is not merged into this layer.")
    with torch.no_grad():
        delta = layer.delta_weight(name)
        weight = layer.base_weight().to(delta.dtype)
        if name in layer.lora_magnitude_vector:
            norm = layer.dora_merge_norms.pop(name)
            weight = weight * (norm / layer.lora_magnitude_vector[name].to(norm.dtype))[:, None]
        layer.set_base_weight(weight - delta)
    layer.merged.remove(name)


def merge_adapters(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Merge ``adapter_name`` (default: the active adapter) into every layer that has it.

    Exact for float bases up to fp32 rounding; :func:`unmerge_adapters` restores the base. While
    merged, switching or disabling adapters is refused (the effect is inside the weights)."""
    name = _resolve(model, adapter_name)
    for layer in _lora_layers(model):
        if name in layer.scaling and name not in layer.merged:
            merge_layer(layer, name)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first)."""
    for layer in _lora_layers(model):
        for name in reversed(list(layer.merged)):
            unmerge_layer(layer, name)
    return model
