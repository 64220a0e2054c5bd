"""Small helpers on module trees shared by quantization and injection."""

from __future__ import annotations

from torch import nn


def find_attribute(model: nn.Module, attr: str):
    """``(module, value)`` for the first module of ``model`` (pre-order, ``model`` first) that holds
    ``attr``, or ``(None, None)``. Bookkeeping such as adapter configs lives on the module the
    adapters were injected into, which may sit inside a LightningModule."""
    for module in model.modules():
        value = module.__dict__.get(attr)
        if value:
            return module, value
    return None, None


def is_adapter_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of the adapter modules :func:`lightning_peft.inject_adapters` puts
    in (a :class:`~lightning_peft.methods.base.AdapterModule`), told by the ``adapter_stores``
    every one of them declares: the layers below ``methods/`` (quantize) need not import it."""
    return isinstance(getattr(type(module), "adapter_stores", None), tuple)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` inside ``model``."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def final_linear(model: nn.Module) -> nn.Module | None:
    """The model's last direct child when it is an ``nn.Linear`` (seen through an adapter
    wrapper): the output layer of a classifier or regressor built from torch modules (a CNN's
    ``classifier``, an MLP's last layer), which transformers' bitsandbytes integration also keeps
    in float. None otherwise (a transformers base model ends with its norm), and for a
    ``ModuleDict`` / ``ModuleList``, whose order says nothing about the forward."""
    if isinstance(model, (nn.ModuleDict, nn.ModuleList)):
        return None
    children = list(model.children())
    last = children[-1] if children else None
    while last is not None and hasattr(last, "wrapped_attr") and last.wrapped_attr:  # an adapter module
        last = getattr(last, last.wrapped_attr)
    return last if isinstance(last, nn.Linear) else None


def output_heads(model: nn.Module) -> set[int]:
    """``id``s of the output heads in ``model``: what ``get_output_embeddings()`` returns for
    ``model`` and every submodule that has it (a transformers model inside a LightningModule),
    seen through adapter wrappers. Such heads are neither quantized nor adapted by default."""
    heads = set()
    for module in model.modules():
        getter = getattr(type(module), "get_output_embeddings", None)
        head = getter(module) if callable(getter) else None
        while head is not None and hasattr(head, "wrapped_attr"):  # an adapter module: its wrapped layer
            head = getattr(head, head.wrapped_attr)
        if head is not None:
            heads.add(id(head))
    return heads
