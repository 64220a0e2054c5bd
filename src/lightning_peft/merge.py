r"""Fold adapters into the base weights, take them out again, or export a merged float model.

    LoRA   merge:  W <- W + s B A                 unmerge: W <- W - s B A
    DoRA   merge:  W <- m / n * (W + s B A),  n = ||W + s B A||_row (kept for unmerge)
           unmerge: W <- W * n / m - s B A
    (IA)^3 merge:  W <- diag(l) W, b <- l * b  (output)  or  W <- W diag(l)  (input);  unmerge divides
    BitFit merge:  b <- b + d (a layer without a bias gets d)                           unmerge subtracts

Bottleneck adapters (nonlinear) and prompt / prefix tuning (virtual tokens) cannot be merged.

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
from .methods import (BitFitLayer, BottleneckLayer, IA3Layer, LoraLayer, LoraParamLayer, ModulesToSave, PromptLearning,
                      TrainableTokensLayer)
from .quantize import dequantize_weight, is_quantized, quant_config, requantize_

MANIFEST_NAME = "lightning_peft_export.json"
# what an export owns in its directory (replaced by each export); anything else there is kept
EXPORT_FILES = (WEIGHTS_NAME, "model-*-of-*.safetensors", INDEX_NAME, MANIFEST_NAME)


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for _, m in adapter_modules(model) if isinstance(m, LoraLayer)]


def _resolve(model: nn.Module, adapter_name: str | None) -> str:
    configs = adapter_configs(model)
    modules = [m for _, m in adapter_modules(model)]
    name = adapter_name if adapter_name is not None else (modules[0].active_adapter if modules else None)
    if name not in configs:
        raise ValueError(f"no adapter {name!r} to merge; this model has {list(configs)}.")
    return name


def merged_weight(layer: LoraLayer, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', n)``: ``weight: [out, in]`` with adapter ``name`` folded in, in at least fp32, and
    the DoRA row norms ``n`` (None for LoRA)."""
    delta = layer.delta_weight(name)
    merged = weight.to(delta.dtype) + delta
    if name not in layer.lora_magnitude_vector:
        return merged, None
    norm = torch.linalg.vector_norm(merged, dim=1)
    return merged * (layer.dora_magnitude(name).to(norm.dtype) / norm)[:, None], norm


def merge_layer(layer: LoraLayer, name: str, allow_lossy: bool = False) -> float | None:
    """Fold adapter ``name`` of one layer into its base weight.

    For a quantized base (only with ``allow_lossy``) returns the fraction of the adapter's weight
    update lost to re-quantization, ``||W_q' - W_q - dW|| / ||dW||``."""
    if name in layer.merged:
        raise RuntimeError(f"adapter {name!r} is already merged into this layer.")
    _refuse_layer_merge([layer], name)
    _refuse_lora_bias_without_base_bias([layer], name)
    with torch.no_grad():
        weight = layer.base_weight()
        merged, norm = merged_weight(layer, name, weight)
        lost = None
        if layer.quantized:
            if not allow_lossy:
                raise RuntimeError(_LOSSY_MESSAGE)
            requantize_(layer.base_layer, merged)
            update = merged - weight.to(merged.dtype)
            realised = layer.base_weight().to(merged.dtype) - weight.to(merged.dtype)
            lost = ((realised - update).norm() / update.norm().clamp_min(1e-30)).item()
        else:
            layer.set_base_weight(merged)
        _add_lora_bias(layer, name, +1)
        if norm is not None:
            layer.dora_merge_norms[name] = norm
    layer.merged.append(name)
    layer.clear_stack_cache()  # a re-quantized base is a new tensor: no version bump to see
    return lost


def _refuse_layer_merge(layers: list[LoraLayer], name: str) -> None:
    """Raise, before anything changes, if a layer cannot hold adapter ``name`` in its weight."""
    for layer in layers:
        reason = layer.merge_refusal(name)
        if reason:
            raise RuntimeError(reason)


def _refuse_lora_bias_without_base_bias(layers: list[LoraLayer], name: str) -> None:
    for layer in layers:
        if name in layer.lora_B and layer.lora_B[name].bias is not None and getattr(layer.base_layer, "bias", None) is None:
            raise RuntimeError(f"adapter {name!r} has a lora_B bias (lora_bias=True) on a layer without a bias to fold it "
                               f"into ({type(layer.base_layer).__name__}(bias=False)); keep the adapter unmerged (PEFT "
                               f"cannot merge it either).")


def _add_lora_bias(layer: LoraLayer, name: str, sign: int) -> None:
    """Base bias ``+= sign * s * b_B`` for an adapter with a lora_B bias (``lora_bias``)."""
    if name in layer.lora_B and layer.lora_B[name].bias is not None:
        bias = layer.base_layer.bias
        with torch.no_grad():
            bias.copy_(bias.float() + sign * layer.scaling[name] * layer.lora_B[name].bias.float())


_LOSSY_MESSAGE = (
    "refusing to merge into a quantized (4-bit/8-bit) base in place: re-quantizing W + dW rounds most of "
    "a small adapter update away (NF4 rounding error is ~10% of ||W||, a trained update ~0.5%), so the "
    "merged model can be worse than dropping the adapter. Use lightning_peft.export_merged(model, "
    "directory) to write a merged float model (dequantize -> merge in fp32 -> safetensors), or pass "
    "allow_lossy=True to merge anyway (a warning states the measured loss; it cannot be unmerged).")


def unmerge_layer(layer: LoraLayer, name: str) -> None:
    """Take adapter ``name`` back out of one layer's base weight."""
    if name not in layer.merged:
        raise RuntimeError(f"adapter {name!r} is not merged into this layer.")
    if layer.quantized:
        raise RuntimeError(f"adapter {name!r} was merged lossily into a quantized weight and cannot be taken "
                           f"out again; reload the base model and the adapter (load_adapter).")
    with torch.no_grad():
        delta = layer.delta_weight(name)
        weight = layer.base_weight().to(delta.dtype)
        if name in layer.lora_magnitude_vector:
            norm = layer.dora_merge_norms.pop(name)
            weight = weight * (norm / layer.dora_magnitude(name).to(norm.dtype))[:, None]
        layer.set_base_weight(weight - delta)
        _add_lora_bias(layer, name, -1)
    layer.merged.remove(name)
    layer.clear_stack_cache()


def merge_adapters(model: nn.Module, adapter_name: str | None = None, allow_lossy: bool = False) -> nn.Module:
    """Merge ``adapter_name`` (default: the active adapter) into every layer that has it.

    Exact for float bases up to fp32 rounding; :func:`unmerge_adapters` restores the base. While
    merged, switching or disabling adapters is refused (the effect is inside the weights).
    Quantized bases are refused before anything changes unless ``allow_lossy=True``, which
    re-quantizes the merged weights and warns with the measured fraction of the update lost."""
    name = _resolve(model, adapter_name)
    _refuse_unmergeable(model, name)
    layers = [m for m in _lora_layers(model) if name in m.scaling and name not in m.merged]
    others = [m for _, m in adapter_modules(model)
              if isinstance(m, (IA3Layer, BitFitLayer, LoraParamLayer, TrainableTokensLayer)) and name in m.adapter_names()
              and name not in m.merged]
    if not allow_lossy and any(m.quantized for m in layers):
        raise RuntimeError(_LOSSY_MESSAGE)
    _refuse_lora_bias_without_base_bias(layers, name)
    _refuse_layer_merge(layers, name)
    if any(isinstance(m, IA3Layer) and m.quantized for m in others):
        raise RuntimeError(f"adapter {name!r} is (IA)^3 over a quantized base: scaling a 4-bit weight in place "
                           f"re-quantizes it and loses the update. Use lightning_peft.export_merged(model, directory) "
                           f"to write a merged float model.")
    for module in others:  # exact for float bases; BitFit also over a quantized one (the bias is float)
        module.merge(name)
    losses = [merge_layer(layer, name, allow_lossy) for layer in layers]
    losses = [x for x in losses if x is not None]
    if losses:
        warnings.warn(f"merged adapter {name!r} into {len(losses)} quantized layers: re-quantization lost "
                      f"{100 * sum(losses) / len(losses):.1f}% of the adapter's weight update on average "
                      f"(worst layer {100 * max(losses):.1f}%). export_merged keeps all of it.", stacklevel=2)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first)."""
    for layer in _lora_layers(model):
        for name in reversed(list(layer.merged)):
            unmerge_layer(layer, name)
    for _, module in adapter_modules(model):
        if isinstance(module, (IA3Layer, BitFitLayer, LoraParamLayer, TrainableTokensLayer)):
            for name in reversed(list(module.merged)):
                module.unmerge(name)
    return model


def _refuse_unmergeable(model: nn.Module, name: str) -> None:
    methods = sorted({m.method_name(name) for _, m in adapter_modules(model)
                      if isinstance(m, (BottleneckLayer, PromptLearning)) and name in m.adapter_names()})
    if methods:
        raise ValueError(f"adapter {name!r} is a {methods[0]} adapter, which cannot be folded into the base weights "
                         f"(bottleneck adapters are nonlinear; prompt and prefix tuning add virtual tokens). Keep "
                         f"the adapter at inference: save_adapter / load_adapter.")


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

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, ModulesToSave):
            chosen = module.modules_to_save[name] if name in module.modules_to_save else module.original_module
            return visit(chosen, prefix)
        if isinstance(module, LoraLayer):
            weight = module.base_weight()
            if name in module.scaling and name not in module.merged:
                _refuse_layer_merge([module], name)
                weight, _ = merged_weight(module, name, weight)
            state[prefix + module.weight_key] = module.stored_weight(weight)
            if module.weight_key != "weight":  # a module with more than one weight (MultiheadAttention): the rest
                base = module.base_layer
                for key, param in base.named_parameters(recurse=False):
                    state.setdefault(prefix + key, param)
                for key, child in base.named_children():
                    visit(child, prefix + key + ".")
                return None
            bias = getattr(module.base_layer, "bias", None)
            lora_b = module.lora_B[name] if name in module.lora_B else None
            if lora_b is not None and lora_b.bias is not None and name not in module.merged:  # lora_bias
                _refuse_lora_bias_without_base_bias([module], name)
                bias = bias.float() + module.scaling[name] * lora_b.bias.float()
            if bias is not None:
                state[prefix + "bias"] = bias
            return None
        if isinstance(module, IA3Layer):
            if name in module.ia3_l and name not in module.merged:
                weight, bias = module.merged_base(name)
            else:
                weight, bias = module.base_weight(), getattr(module.base_layer, "bias", None)
            state[prefix + "weight"] = weight.t() if module.transposed else weight
            if bias is not None:
                state[prefix + "bias"] = bias
            return None
        if isinstance(module, LoraParamLayer):  # the module's own state, its parameter updated
            visit(module.base_layer, prefix)
            if name in module.scaling and name not in module.merged:
                state[prefix + module.parameter_name] = module.merged_param(name)
            return None
        if isinstance(module, TrainableTokensLayer):  # the embedding (or tied head) with the trained rows
            visit(module.base_layer, prefix)
            if name in module.adapter_names() and name not in module.merged:
                state[prefix + "weight"] = module.merged_weight(name)
            return None
        if isinstance(module, PromptLearning):  # holds only other adapters (checked above)
            return None
        if isinstance(module, (BitFitLayer, BottleneckLayer)):
            visit(module.base_layer, prefix)
            if isinstance(module, BitFitLayer) and name in module.bitfit_bias and name not in module.merged:
                state[prefix + "bias"] = module.merged_bias(name)
            return None
        if is_quantized(module):
            state[prefix + "weight"] = dequantize_weight(module)
            if module.bias is not None:
                state[prefix + "bias"] = module.bias
            return None
        for key, param in module.named_parameters(recurse=False):
            state[prefix + key] = param
        for key, buffer in module.named_buffers(recurse=False):
            if key not in module._non_persistent_buffers_set:
                state[prefix + key] = buffer
        for key, child in module.named_children():
            visit(child, prefix + key + ".")
        return None

    with torch.no_grad():
        visit(model, "")
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
