r"""Fold adapters into the base weights, take them out again, or export a merged float model.

    LoRA   merge:  W <- W + s B A                 unmerge: W <- W - s B A
    DoRA   merge:  W <- m / n * (W + s B A),  n = ||W + s B A||_row (kept for unmerge)
           unmerge: W <- W * n / m - s B A
    (IA)^3 merge:  W <- diag(l) W, b <- l * b  (output)  or  W <- W diag(l)  (input);  unmerge divides
    BitFit merge:  b <- b + d (a layer without a bias gets d)                           unmerge subtracts

Bottleneck adapters (nonlinear) and prompt / prefix tuning (virtual tokens) cannot be merged.

Each adapter module does its own arithmetic through the merge protocol of
:class:`~lightning_peft.methods.base.AdapterModule` (``mergeable``, ``merge_refusal``, ``merge``,
``unmerge``, ``merged_state``; docs/architecture.md, "The adapter-module protocol"): this module
only loops over the modules, with no per-method code.

Arithmetic runs in fp32 (or the base's wider dtype) and is cast back once. A merged adapter is
skipped in ``forward`` (its effect is in the weight), so the merged model computes the same
function with one matmul per layer.

A quantized base is different: writing ``W + s B A`` back into 4 bits rounds most of a small
update away (a typical delta is ~0.5% of ``||W||``, well under NF4's ~10% rounding error), so
``merge_adapters`` refuses it unless ``allow_lossy=True``. :func:`export_merged` is the lossless
path: dequantize, merge in fp32, write a float ``model.safetensors`` with the original keys.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import merged_card, write_card
from .atomic import atomic_directory
from .export import (DEFAULT_MAX_SHARD_SIZE, INDEX_NAME, WEIGHTS_NAME, base_directory, write_config, write_tokenizer,
                     write_weights)
from .inject import adapter_configs, adapter_modules, adapter_owner
from .methods import AdapterModule
from .quantize import dequantize_weight, is_quantized, quant_config

MANIFEST_NAME = "lightning_peft_export.json"
# what an export owns in its directory (replaced by each export); anything else there is kept
EXPORT_FILES = (WEIGHTS_NAME, "model-*-of-*.safetensors", INDEX_NAME, MANIFEST_NAME)


def _resolve(model: nn.Module, adapter_name: str | None) -> str:
    configs = adapter_configs(model)
    modules = [m for _, m in adapter_modules(model)]
    name = adapter_name if adapter_name is not None else (modules[0].active_adapter if modules else None)
    if name not in configs:
        raise ValueError(f"no adapter {name!r} to merge; this model has {list(configs)}.")
    return name


def merge_adapters(model: nn.Module, adapter_name: str | None = None, allow_lossy: bool = False) -> nn.Module:
    """Merge ``adapter_name`` (default: the active adapter) into every layer that has it.

    Exact for float bases up to fp32 rounding; :func:`unmerge_adapters` restores the base. While
    merged, switching or disabling adapters is refused (the effect is inside the weights).
    Quantized bases are refused before anything changes unless ``allow_lossy=True``, which
    re-quantizes the merged weights and warns with the measured fraction of the update lost."""
    name = _resolve(model, adapter_name)
    _refuse_unmergeable(model, name)
    modules = [m for _, m in adapter_modules(model) if name in m.adapter_names() and name not in m.merged]
    for module in modules:  # every refusal before anything changes
        refusal = module.merge_refusal(name, allow_lossy)
        if refusal is not None:
            raise refusal
    losses = [module.merge(name, allow_lossy) for module in modules]
    losses = [x for x in losses if x is not None]
    if losses:
        warnings.warn(f"merged adapter {name!r} into {len(losses)} quantized layers: re-quantization lost "
                      f"{100 * sum(losses) / len(losses):.1f}% of the adapter's weight update on average "
                      f"(worst layer {100 * max(losses):.1f}%). export_merged keeps all of it.", stacklevel=2)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first)."""
    for _, module in adapter_modules(model):
        for name in reversed(list(module.merged)):
            module.unmerge(name)
    return model


def _refuse_unmergeable(model: nn.Module, name: str) -> None:
    """Raise the ``ValueError`` of the first module whose method cannot fold adapter ``name`` at all
    (a quantized base is no reason here: exports dequantize)."""
    for _, module in adapter_modules(model):
        if not module.mergeable and name in module.adapter_names():
            raise module.merge_refusal(name)


# ----------------------------------------------------------------------------------- export
def merged_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain architecture with adapter ``adapter_name`` (default: the
    active one) merged in: original key names, quantized weights dequantized, adapter tensors
    gone, ``modules_to_save`` copies in place of the originals. Merged weights are fp32 or wider;
    other tensors keep their dtype. Nothing in ``model`` changes. Keys are relative to the module
    the adapters were injected into (the transformers model inside a LightningModule)."""
    model = adapter_owner(model) or model
    name = _resolve(model, adapter_name) if adapter_configs(model) else None
    if name is not None:
        _refuse_unmergeable(model, name)
    state: dict[str, torch.Tensor] = {}

    def base_state(module: nn.Module) -> dict[str, torch.Tensor]:
        own: dict[str, torch.Tensor] = {}
        visit(module, "", own)
        return own

    def visit(module: nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> None:
        if isinstance(module, AdapterModule):  # the method says what its layer becomes
            for key, tensor in module.merged_state(name, base_state).items():
                state[prefix + key] = tensor
            return
        if is_quantized(module):
            state[prefix + "weight"] = dequantize_weight(module)
            if module.bias is not None:
                state[prefix + "bias"] = module.bias
            return
        for key, param in module.named_parameters(recurse=False):
            state[prefix + key] = param
        for key, buffer in module.named_buffers(recurse=False):
            if key not in module._non_persistent_buffers_set:
                state[prefix + key] = buffer
        for key, child in module.named_children():
            visit(child, prefix + key + ".", state)

    with torch.no_grad():
        visit(model, "", state)
    return state


def export_merged(model: nn.Module, directory: str | Path, dtype: torch.dtype = torch.bfloat16,
                  adapter_name: str | None = None, *, base: str | Path | None = None, tokenizer: Any = None,
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, trainer: Any = None) -> Path:
    """Write the merged model as a ``from_pretrained`` directory: the weights with the keys of the
    original architecture (so it loads without lightning_peft), ``config.json`` and
    ``generation_config.json`` of the base, its tokenizer files, a model card (``README.md``) and
    ``lightning_peft_export.json`` (what was merged, how).

    Quantized weights are dequantized, adapters merged in fp32, then float tensors cast to
    ``dtype`` once; the model itself is not changed.

    Args:
        base: the base model's local directory, for ``config.json`` / ``generation_config.json``
            when ``model`` is not a transformers model, and for the tokenizer files
            (default: ``model.name_or_path`` when that is a local directory).
        tokenizer: a transformers tokenizer to save with the model (instead of the base's files).
        max_shard_size: above it (bytes, or ``"5GB"``, ``"500MB"``), the weights are split into
            ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``, as
            ``save_pretrained`` does.
        trainer: the Lightning Trainer of the fit, for the card's data counts and final metrics.

    Non-finite merged weights (NaN/inf adapters) are refused before anything is written.
    Everything is written into a hidden sibling of ``directory`` first, then the whole directory
    is swapped in atomically (docs/reliability.md): a crash leaves the previous export or the new
    one. Weight files of an earlier export that this one does not replace go; other files there
    stay. Returns the path of the weights file (of the index when sharded)."""
    directory = Path(directory)
    owner = adapter_owner(model) or model
    base_dir = base_directory(owner, base)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in merged_state_dict(model, adapter_name).items():
        out = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
        if out.data_ptr() in seen:  # tied weights: safetensors stores each storage once per key
            out = out.clone()
        seen.add(out.data_ptr())
        tensors[key] = out
    configs = adapter_configs(model)
    quant = quant_config(model)
    name = _resolve(model, adapter_name) if configs else None
    adapter_config = configs[name].to_dict() if configs else None
    if adapter_config is not None:
        adapter_config["base_model_name_or_path"] = getattr(owner, "name_or_path", None) or (
            str(base_dir) if base_dir else None)
    _refuse_nonfinite(tensors, directory)
    # the whole directory is replaced atomically (docs/reliability.md); of an earlier export's files,
    # the weight files (shards of another count, an index) go, anything else this one does not write stays
    with atomic_directory(directory, owned=EXPORT_FILES) as staging:
        files = write_weights(staging, tensors, max_shard_size)
        weights = files[-1] if len(files) > 1 else files[0]
        files += write_config(staging, owner, base_dir, dtype)
        files += write_tokenizer(staging, base_dir, tokenizer)
        manifest = {
            "weights": weights,
            "dtype": str(dtype).removeprefix("torch."),
            "adapter": name,
            "adapter_config": adapter_config,
            "quantized_base": None if quant is None else quant.to_dict(),
            "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        write_card(staging, merged_card(manifest, model if configs else None, trainer, files + [MANIFEST_NAME]))
    return directory / weights


def _refuse_nonfinite(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"export_merged: non-finite weights (NaN or inf) in {len(bad)} merged tensors "
                         f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); nothing was written to {directory}. "
                         f"The adapters diverged in training: export an earlier checkpoint (AdapterCheckpoint keeps "
                         f"only finite saves), and lower the learning rate or keep the strategy's nonfinite='raise'.")
