r"""A frozen 4-bit (NF4/FP4) or 8-bit base via bitsandbytes, on CPU or CUDA.

NF4 stores each weight as a 4-bit index into 16 quantiles of N(0, 1), scaled per block of
``blocksize`` values by the block's absmax. With double quantization the fp32 absmax constants are
themselves quantized to 8 bits (blocks of 256, one fp32 constant each):

    bits/param = 4 + 8 / 64 + 32 / (64 * 256) = 4.127        (4 + 32 / 64 = 4.5 without)

``quantize_base`` swaps ``nn.Linear`` layers for ``bnb.nn.Linear4bit`` (``Linear8bitLt`` for int8)
in place, quantizing with bitsandbytes' functional API on the weight's own device, and freezes
every parameter of the model. Adapters go on top with :func:`lightning_peft.inject_adapters`;
they see the dequantized weight through :func:`dequantize_weight`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

# bitsandbytes warns at import on AVX512-BF16 CPUs that an optional hub kernel for its CPU-packed
# 4-bit layout is missing. quantize_linear turns that layout off, so the kernel is never used:
# drop that one message (every other bitsandbytes message passes).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"))

import importlib  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

from .config import QuantConfig  # noqa: E402
from .modules import final_linear, find_attribute, is_adapter_module, output_heads, replace_module  # noqa: E402

QUANT_CONFIG_ATTR = "lp_quant_config"


class _Deferred:
    """A module imported on first attribute access: bitsandbytes takes seconds to import (it
    loads its native libraries), which a float-only run or ``lightning-peft --help`` should not pay."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


bnb = _Deferred("bitsandbytes")
bnb_functional = _Deferred("bitsandbytes.functional")


def is_quantized(module: nn.Module) -> bool:
    """True for the bitsandbytes layers :func:`quantize_base` creates."""
    if "bitsandbytes" not in sys.modules:  # not imported yet: no module can be one of its layers
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def logical_numel(param: torch.Tensor) -> int:
    """How many weights ``param`` stands for: a packed 4-bit tensor holds two per byte, so its
    ``numel()`` is half the layer's ``out * in`` (read from its quant state instead)."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None and hasattr(state, "shape") else param.numel()


def quant_config(model: nn.Module) -> QuantConfig | None:
    """The :class:`QuantConfig` ``model`` (or the submodule of it that was quantized) used, or None."""
    return find_attribute(model, QUANT_CONFIG_ATTR)[1]


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float weight ``[out, in]`` a bitsandbytes layer stands for (a new tensor)."""
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB  # moves on 1st forward
    return weight.data.float() * (scale.float()[:, None] / 127.0)


def _params4bit(weight: torch.Tensor, config: QuantConfig, module: nn.Module) -> bnb.nn.Params4bit:
    """Quantize a float weight with bitsandbytes' functional API on its own device."""
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=config.blocksize,
                                                 compress_statistics=config.double_quant,
                                                 quant_type=config.quant_type, quant_storage=config.quant_storage)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=config.blocksize,
                             compress_statistics=config.double_quant, quant_type=config.quant_type,
                             quant_storage=config.quant_storage, module=module, bnb_quantized=True)


def quantize_linear(linear: nn.Linear, config: QuantConfig, device: torch.device | str | None = None) -> nn.Module:
    """A frozen bitsandbytes copy of ``linear``, quantized on ``device`` (default: where its
    weight lives)."""
    weight = linear.weight.detach()
    if weight.is_meta:
        raise ValueError("cannot quantize a layer on the meta device: its weights were never loaded. "
                         "Materialise the model (or load its checkpoint) before quantize_base; for a model "
                         "built with lp.empty_init, lp.load_quantized streams the checkpoint in and quantizes.")
    weight = weight.to(device) if device is not None else weight
    has_bias = linear.bias is not None
    if config.is_4bit:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=config.compute_dtype, compress_statistics=config.double_quant,
                                  quant_type=config.quant_type, quant_storage=config.quant_storage, device="meta")
        layer.weight = _params4bit(weight, config, layer)
        # bitsandbytes repacks the weight in place into a CPU-only bf16 layout on the first
        # eval-mode forward (AVX512-BF16 machines): the bytes, dtype and dequantization change under
        # us. Keep the standard layout so dequantize, merge, export and DDP see one format.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        layer.weight = layer.weight.to(weight.device)  # Int8Params quantizes on .to(device)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(weight.device, copy=True), requires_grad=False)
    layer.train(linear.training)
    return layer


def requantize_(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the quantized weight of ``module`` by the quantization of ``weight: [out, in]``,
    with the layer's own settings (quant type, block size, double quant, storage dtype)."""
    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        config = QuantConfig(quant_type=state.quant_type, double_quant=state.nested, blocksize=state.blocksize,
                             compute_dtype=module.compute_dtype or torch.float32,
                             quant_storage=module.weight.quant_storage)
        module.weight = _params4bit(weight.to(state.dtype), config, module)
    else:
        module.weight = bnb.nn.Int8Params(weight.float().clone(), requires_grad=False,
                                          has_fp16_weights=False).to(module.weight.device)
        module.state.SCB = module.state.CB = None  # the layer caches the old ones after a forward


def _skipped(path: str, module: nn.Module, heads: set[int], config: QuantConfig) -> bool:
    return id(module) in heads or any(path == s or path.endswith("." + s) for s in config.skip_modules)


def quantization_targets(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """``(path, layer)`` of every ``nn.Linear`` of ``model`` that :func:`quantize_base` replaces:
    all but ``config.skip_modules`` and the output head. Works on a model built on the meta device.

    Raises if ``model`` is quantized already, carries adapters, or has no such layer."""
    if quant_config(model) is not None:
        raise RuntimeError("model is already quantized (quantize_base ran on it before).")
    if any(is_adapter_module(m) for m in model.modules()):
        raise RuntimeError("quantize_base must run before inject_adapters: the adapters would wrap the float "
                           "layers. Quantize first, then inject (or use load_adapter after quantizing).")
    heads = output_heads(model)
    head = final_linear(model)  # any model's output layer stays float, not only a transformers head
    if head is not None:
        heads.add(id(head))
    targets = [(path, m) for path, m in model.named_modules()
               if type(m) is nn.Linear and not _skipped(path, m, heads, config)]
    if not targets:
        raise ValueError(f"quantize_base found no nn.Linear layer to quantize in {type(model).__name__} "
                         f"(skip_modules={config.skip_modules}). QLoRA quantizes linear layers; for a model "
                         f"without them train without quantization (e.g. strategy='lora').")
    return targets


def mark_quantized(model: nn.Module, config: QuantConfig) -> None:
    """Freeze every parameter of ``model`` and record ``config`` on it (``model.lp_quant_config``)."""
    for param in model.parameters():
        param.requires_grad_(False)
    object.__setattr__(model, QUANT_CONFIG_ATTR, config)


def quantize_base(model: nn.Module, config: QuantConfig | None = None,
                  device: torch.device | str | None = None) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` (but ``skip_modules`` and the output head) in
    place, and freeze all of the model's parameters. Returns ``model`` itself.

    With ``device``, each layer is moved there and quantized one at a time (the float model never
    has to fit on the device); other parameters stay where they are. For a model too big for memory
    in float, build it with :func:`lightning_peft.empty_init` and stream its checkpoint in with
    :func:`lightning_peft.load_quantized` instead (the same layers, byte for byte).

    Call it before :func:`lightning_peft.inject_adapters`. The config is kept on the model as
    ``model.lp_quant_config`` (read by merging and export).
    """
    config = config or QuantConfig()
    for path, linear in quantization_targets(model, config):
        replace_module(model, path, quantize_linear(linear, config, device))
    mark_quantized(model, config)
    return model


# --------------------------------------------------------------------------------- memory report
def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _quantized_bytes(module: nn.Module) -> tuple[int, int]:
    """``(bytes that scale with the weight, code-book bytes)`` of one bitsandbytes layer.

    The first part is the packed weight plus its per-block constants (absmax, and with double
    quantization the second-level absmax and offset). Code books (16 NF4/FP4 levels, 256-entry
    map of the nested absmax) are fixed tables of the format, the same values in every layer."""
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = weight.quant_state
        scaled = _nbytes(weight.data) + _nbytes(state.absmax)
        codebooks = _nbytes(state.code)
        if state.nested:
            scaled += _nbytes(state.state2.absmax) + _nbytes(state.offset)
            codebooks += _nbytes(state.state2.code)
        return scaled, codebooks
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return _nbytes(weight.data) + _nbytes(scale), 0


@dataclass
class MemoryReport:
    """Bytes of a model's parameters, split into quantized linear weights and float parameters.

    ``quantized_bytes`` is the packed weights plus their per-block constants;
    ``codebook_bytes`` the format's lookup tables, which each layer holds a copy of (about 1 KB
    per layer with double quantization), counted apart so that bytes/param shows the format's
    cost (NF4 + double quant: 4.127 bits = 0.516 bytes)."""

    quantized_params: int
    quantized_bytes: int
    codebook_bytes: int
    float_params: int
    float_bytes: int
    per_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def quantized_bytes_per_param(self) -> float:
        return self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.codebook_bytes + self.float_bytes

    def table(self) -> Table:
        table = Table(title="lightning-peft memory")
        for column in ("part", "params", "bytes", "bytes/param"):
            table.add_column(column, justify="right" if column != "part" else "left")
        rows = [("quantized linear weights", self.quantized_params, self.quantized_bytes),
                ("float parameters", self.float_params, self.float_bytes)]
        for part, params, size in rows:
            table.add_row(part, f"{params:,}", f"{size:,}", f"{size / params:.4f}" if params else "-")
        table.add_row("code books (per layer copies)", "", f"{self.codebook_bytes:,}", "")
        table.add_row("total", f"{self.quantized_params + self.float_params:,}", f"{self.total_bytes:,}", "")
        return table


def memory_report(model: nn.Module, show: bool = True, console: Console | None = None) -> MemoryReport:
    """Count parameter bytes: quantized weights with their constants, float parameters by dtype.
    Prints a rich table unless ``show=False``."""
    quantized_params = quantized_bytes = codebook_bytes = 0
    skip: set[int] = set()
    for module in model.modules():
        if is_quantized(module):
            scaled, codebooks = _quantized_bytes(module)
            quantized_params += module.in_features * module.out_features
            quantized_bytes += scaled
            codebook_bytes += codebooks
            skip.add(id(module.weight))
    float_params = float_bytes = 0
    per_dtype: dict[str, int] = {}
    for param in model.parameters():
        if id(param) in skip:
            continue
        float_params += param.numel()
        float_bytes += _nbytes(param)
        key = str(param.dtype).removeprefix("torch.")
        per_dtype[key] = per_dtype.get(key, 0) + _nbytes(param)
    report = MemoryReport(quantized_params, quantized_bytes, codebook_bytes, float_params, float_bytes, per_dtype)
    if show:
        (console or Console()).print(report.table())
    return report
