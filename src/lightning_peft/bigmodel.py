r"""Models bigger than memory: build on the meta device, stream the checkpoint straight into 4-bit.

QLoRA fits a 70B model on one 48 GB card only if the float model never exists: 70B parameters
are 140 GB in bf16, 35.5 GB in NF4 (4.127 bits each with double quantization). Two steps:

1. ``with empty_init(): model = MyModel(config)`` creates every parameter on the meta device
   (shape and dtype, no storage, no random init). Buffers stay real, so a rotary embedding's
   non-persistent ``inv_freq`` (computed in ``__init__``, never saved) is right.
2. ``load_quantized(model, path, QuantConfig(), device=...)`` reads the safetensors checkpoint
   one tensor at a time. The weight of each linear layer :func:`quantize_base` would quantize is
   quantized on ``device`` as it arrives (the same ``bnb.nn.Linear4bit`` layers, byte for byte);
   every other tensor is copied in the dtype the model declared for it.

Peak memory while loading, with ``M`` the loaded model's bytes (NF4 weights + float rest) and
``T`` the largest float tensor of the checkpoint:

    peak <= M + ~3 T     one tensor in flight: its file pages (safetensors memory-maps the file;
                          the pages are unmapped when the tensor is freed) plus a cast copy or
                          bitsandbytes' quantization temporaries (~2.4 T on the CPU)

against ``>= 2 x float size`` for building in float, loading a state dict and quantizing.

Every key is checked from the file headers before anything is read: missing, unexpected and
mis-shaped keys come in one error and the model is left as it was. Tied parameters (``lm_head``
sharing the embedding) need one of their names in the file and stay tied.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import QuantConfig
from .modules import replace_module
from .quantize import mark_quantized, quantization_targets, quantize_linear

INDEX_SUFFIX = ".safetensors.index.json"
_REGISTER_PARAMETER = nn.Module.register_parameter  # torch's own, whatever empty_init does
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if os.name == "posix" else None


# ------------------------------------------------------------------------------ building on meta
@contextmanager
def empty_init() -> Iterator[None]:
    """Create the parameters of modules built inside on the meta device.

    ``nn.Parameter`` tensors are moved to meta as they are registered, before any initialisation
    touches them: an ``nn.Linear(8192, 28672)`` costs no memory and no time (its ``torch.empty``
    is never written). Buffers are left alone (they are small, and a non-persistent one such as
    rotary ``inv_freq`` is computed here and absent from checkpoints). Fill the model with
    :func:`load_quantized`."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if type(param) is nn.Parameter and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# ------------------------------------------------------------------------------ tensor sources
class TensorSource(Protocol):
    """Where :func:`stream_quantized` reads tensors from: names with shapes first, then one
    tensor at a time. :class:`SafetensorsCheckpoint` is the file-backed one."""

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def read(self, key: str) -> torch.Tensor: ...


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of ``path``: a ``.safetensors`` file, a ``*.safetensors.index.json``
    (the shards it names), or a directory holding one of those (``model.safetensors.index.json``
    or ``model.safetensors`` first, as ``save_pretrained`` writes them)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / f"model{INDEX_SUFFIX}", path / "model.safetensors",
                      *sorted(path.glob(f"*{INDEX_SUFFIX}")), *sorted(path.glob("*.safetensors"))]
        found = [c for c in candidates if c.is_file()]
        if not found:
            pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = (f" It holds pickled weights ({', '.join(pickled[:3])}): convert them to safetensors "
                    f"(safetensors.torch.save_file) first." if pickled else "")
            raise FileNotFoundError(f"no safetensors checkpoint in {path} (looked for model{INDEX_SUFFIX}, "
                                    f"model.safetensors, *.safetensors).{hint}")
        if found[0].name.endswith(INDEX_SUFFIX) or len({c.name for c in found}) == 1:
            path = found[0]
        else:
            raise ValueError(f"{path} holds several safetensors files ({', '.join(sorted({c.name for c in found}))}) "
                             f"but no *{INDEX_SUFFIX} saying how they fit together: pass the file to load.")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    if path.name.endswith(INDEX_SUFFIX):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a safetensors index (JSON with a 'weight_map'): {err!r}.") from None
        shards = [path.parent / name for name in dict.fromkeys(weight_map.values())]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise FileNotFoundError(f"{path} names shards that are not in {path.parent}: {', '.join(absent)}.")
        return shards
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoints are read from safetensors only (a .safetensors file, a "
                         f"*{INDEX_SUFFIX} or a directory holding them); pickled .bin/.pt files are refused.")
    return [path]


class SafetensorsCheckpoint:
    """A safetensors checkpoint (one file or shards) read one tensor at a time.

    Shapes come from the file headers. :meth:`read` opens the file for that one tensor: the
    tensor is a view of the memory-mapped file, so the page cache holds its bytes and the pages
    leave the process when the tensor is freed (a file kept open would keep every page it read)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for shard in checkpoint_files(path):
            try:
                with safe_open(shard, framework="pt") as handle:
                    for key in handle.keys():
                        if key in self._file:
                            raise ValueError(f"tensor {key!r} is in two shards: {self._file[key].name} and "
                                             f"{shard.name}; the checkpoint is inconsistent.")
                        self._file[key] = shard
                        self._shapes[key] = tuple(handle.get_slice(key).get_shape())
            except (OSError, SafetensorError) as err:
                raise ValueError(f"{shard} is not a readable safetensors file ({err}).") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, key: str) -> torch.Tensor:
        with safe_open(self._file[key], framework="pt") as handle:
            return handle.get_tensor(key)


# ---------------------------------------------------------------------------------- the plan
@dataclass
class _Slot:
    """One name under which ``model`` holds a tensor: ``owner.<attr>``, reachable as ``key``."""

    key: str
    owner: nn.Module
    attr: str
    tensor: torch.Tensor
    is_param: bool


@dataclass
class _Plan:
    groups: list[list[_Slot]] = field(default_factory=list)  # slots sharing one tensor (tied weights)
    sources: dict[int, str] = field(default_factory=dict)  # id(group's tensor) -> the key read for it
    targets: list[tuple[str, nn.Linear]] = field(default_factory=list)


def _slots(model: nn.Module) -> tuple[list[_Slot], list[str]]:
    """Every parameter and persistent buffer of ``model`` under every name (tied ones twice), and
    the names of its non-persistent buffers."""
    slots, transient = [], []
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for attr, param in module._parameters.items():
            if param is not None:
                slots.append(_Slot(prefix + attr, module, attr, param, True))
        for attr, buffer in module._buffers.items():
            if buffer is None:
                continue
            if attr in module._non_persistent_buffers_set:
                transient.append(prefix + attr)
            else:
                slots.append(_Slot(prefix + attr, module, attr, buffer, False))
    return slots, transient


def _plan(model: nn.Module, shapes: dict[str, tuple[int, ...]], config: QuantConfig | None, source: str) -> _Plan:
    """Match the checkpoint's keys to ``model``'s tensors; raise one error listing every problem."""
    slots, transient = _slots(model)
    plan = _Plan(targets=quantization_targets(model, config) if config is not None else [])
    by_tensor: dict[int, list[_Slot]] = {}
    for slot in slots:
        by_tensor.setdefault(id(slot.tensor), []).append(slot)
    plan.groups = list(by_tensor.values())
    known = {slot.key for slot in slots}
    missing, mismatched = [], []
    for group in plan.groups:
        present = [s.key for s in group if s.key in shapes]
        if not present:
            tied = f" (tied to {', '.join(s.key for s in group[1:])})" if len(group) > 1 else ""
            missing.append(group[0].key + tied)
            continue
        plan.sources[id(group[0].tensor)] = present[0]
        expected = tuple(group[0].tensor.shape)
        mismatched += [f"{k}: checkpoint {shapes[k]} vs model {expected}" for k in present if shapes[k] != expected]
    # old checkpoints save non-persistent buffers (rotary inv_freq): the model computes its own
    unexpected = sorted(k for k in shapes if k not in known and k not in transient)
    on_meta = [k for k in transient if model.get_buffer(k).is_meta]
    if not (missing or unexpected or mismatched or on_meta):
        return plan
    lines = [f"{source} does not fit {type(model).__name__}; nothing was loaded:"]
    for title, items in (("shape mismatch", mismatched), ("missing from the checkpoint", sorted(missing)),
                         ("in the checkpoint but not in the model", unexpected)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    if missing or unexpected or mismatched:
        lines.append("Build the model from the config the checkpoint was saved with (same sizes and layer "
                     "names; keys are relative to the model passed, e.g. self.model inside a LightningModule).")
    if on_meta:
        lines.append(f"  non-persistent buffers on the meta device ({len(on_meta)}): {'; '.join(on_meta[:8])}. "
                     f"No checkpoint holds them: build the model inside lp.empty_init() (which keeps buffers "
                     f"real) rather than under torch.device('meta').")
    raise ValueError("\n".join(lines))


# ------------------------------------------------------------------------------------ loading
def stream_quantized(model: nn.Module, source: TensorSource, config: QuantConfig | None,
                     device: torch.device | str | None = None, name: str = "the tensor source") -> nn.Module:
    """:func:`load_quantized` from any :class:`TensorSource` (``name`` appears in errors)."""
    device = torch.device(device if device is not None else "cpu")
    plan = _plan(model, source.shapes(), config, name)
    with _params_stay_real():  # loading may run inside empty_init (a Lightning configure_model)
        targets = {id(linear) for _, linear in plan.targets}
        for path, linear in plan.targets:  # quantized on arrival: the float weight is never kept
            replace_module(model, path, quantize_linear(_loaded_linear(linear, source, plan, device), config, device))
            _return_freed_memory(device)
        for group in plan.groups:
            slots = [slot for slot in group if id(slot.owner) not in targets]
            if not slots:
                continue
            value = _read(source, plan.sources[id(group[0].tensor)], group[0].tensor, device, copy=True)
            if slots[0].is_param:
                value = nn.Parameter(value, requires_grad=group[0].tensor.requires_grad)
            for slot in slots:
                (slot.owner._parameters if slot.is_param else slot.owner._buffers)[slot.attr] = value
            del value
            _return_freed_memory(device)
    for module in model.modules():  # the non-persistent buffers, computed at construction
        for attr in [a for a in module._buffers if a in module._non_persistent_buffers_set]:
            module._buffers[attr] = module._buffers[attr].to(device)
    if config is not None:
        mark_quantized(model, config)
    return model


def _loaded_linear(linear: nn.Linear, source: TensorSource, plan: _Plan, device: torch.device) -> nn.Linear:
    """A float copy of the meta ``linear`` holding its checkpoint tensors (to be quantized and
    dropped; ``linear`` itself stays as it was)."""
    loaded = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    for attr in ("weight", "bias"):
        like = getattr(linear, attr)
        if like is not None:  # no copy: quantization reads the file's pages directly when dtypes match
            tensor = _read(source, plan.sources[id(like)], like, device, copy=False)
            setattr(loaded, attr, nn.Parameter(tensor, requires_grad=False))
    return loaded.train(linear.training)


def _read(source: TensorSource, key: str, like: torch.Tensor, device: torch.device, copy: bool) -> torch.Tensor:
    """Tensor ``key`` in ``like``'s dtype on ``device``; ``copy`` so it owns its memory (rather
    than viewing the file's pages when dtype and device already match)."""
    return source.read(key).to(device=device, dtype=like.dtype, copy=copy)


def _return_freed_memory(device: torch.device) -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Quantizing on the CPU allocates temporaries of a few times the layer's size; glibc raises its
    mmap threshold after the first big free, so later ones come from the heap, whose freed pages
    stay in the process: RSS would creep up by a fraction of every layer (+180 MB over a 106M model)."""
    if device.type == "cpu" and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextmanager
def _params_stay_real() -> Iterator[None]:
    """Undo :func:`empty_init`'s patch for the duration (tensors being loaded must stay real)."""
    current = nn.Module.register_parameter
    nn.Module.register_parameter = _REGISTER_PARAMETER
    try:
        yield
    finally:
        nn.Module.register_parameter = current


def load_quantized(model: nn.Module, path: str | os.PathLike, config: QuantConfig | None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Fill ``model`` (built with :func:`empty_init`) from a safetensors checkpoint, quantizing
    as the tensors arrive. Returns ``model`` itself, frozen, as :func:`quantize_base` leaves it.

    Args:
        model: the model the checkpoint's keys are relative to (``self.model`` in a LightningModule
            holding a transformers model: the keys its ``save_pretrained`` writes).
        path: a ``.safetensors`` file, a sharded checkpoint's ``*.safetensors.index.json``, or a
            directory holding one of them.
        config: the quantization (:class:`QuantConfig`); ``None`` loads the float weights as they are.
        device: where the model's tensors go (default CPU); quantization happens there.

    Keys, tied weights and shapes are all checked before anything is read: a mismatch raises one
    ``ValueError`` listing every missing, unexpected and mis-shaped key, with ``model`` untouched.
    Keys of non-persistent buffers (old checkpoints store rotary ``inv_freq``) are ignored."""
    return stream_quantized(model, SafetensorsCheckpoint(path), config, device, name=str(path))
