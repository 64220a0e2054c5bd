r"""Gradient (activation) checkpointing of an adapted model: keep each decoder layer's input,
recompute the layer in backward.

Once the base is 4-bit, activations dominate a fine-tuning step's memory: per token a Llama layer
keeps ``a_layer`` bytes (docs/memory.md), ``L * a_layer`` in all. Checkpointing keeps ``L * c h``
(each layer's input, ``c`` bytes per element) plus one layer's ``a_layer`` while it is recomputed,
for one more forward pass of compute. The non-reentrant form (``use_reentrant=False``) gives
gradients to the adapters inside a layer even though the layer's input needs none (a frozen
embedding), and replays dropout with the saved RNG state, so gradients equal the plain ones.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every decoder layer of ``model`` (non-reentrant) in place; returns ``model``.

    A transformers model (``model`` or the first submodule that supports it) gets its own
    ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` before transformers
    5.x renamed it) with ``use_reentrant=False``.
    Any other model: the layers of its largest ``nn.ModuleList`` of same-type blocks are wrapped
    in ``torch.utils.checkpoint`` (while training with gradients on; state-dict keys unchanged)."""
    for module in model.modules():
        if not getattr(module, "supports_gradient_checkpointing", False):
            continue
        if hasattr(module, "activation_checkpointing_enable"):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return model
        if hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return model
    layers = _decoder_layers(model)
    if layers is None:
        raise ValueError(f"gradient checkpointing: {type(model).__name__} is not a transformers model and has no "
                         f"nn.ModuleList of repeated blocks to checkpoint. Wrap your blocks' forward in "
                         f"torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself.")
    for layer in layers:
        if not getattr(layer, "_lp_checkpointed", False):
            layer.forward = _checkpointed(layer, layer.forward)
            layer._lp_checkpointed = True
    return model


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The ``nn.ModuleList`` of two or more blocks of one type holding the most parameters."""
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(block) for block in m}) == 1]
    lists = [m for m in lists if any(True for _ in m.parameters())]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _checkpointed(layer: nn.Module, forward):
    @functools.wraps(forward)
    def checkpointed_forward(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return checkpointed_forward
