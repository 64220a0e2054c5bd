r"""``estimate_memory``: the bytes a fine-tuning run needs, before you launch it.

Five parts, in bytes (``n`` parameters, ``n_lin`` of them in the linear layers but the output
head, ``t`` trainable; ``w`` bytes per element of ``weight_dtype``, ``a`` of the trainable ones):

    part          full            lora           qlora
    base weights  4 n             w n            q/8 n_lin + w (n - n_lin)
    adapters      -               a t            a t
    gradients     4 n             a t            a t
    optimizer     o n             o t            o t
    activations   tokens * (L * a_layer + a_head)            (tokens = batch * seq_len)

- ``a``, the trainable parameters' dtype, as lightning_peft creates them: fp32 for full
  fine-tuning (master weights) and for adapters over NF4 (as in QLoRA); the base's dtype for LoRA
  adapters over a float base (HF PEFT upcasts those to fp32: pass ``weight_dtype=torch.float32``
  for its numbers).
- ``q``, NF4 bits per weight: 4 + 8/64 + 32/(64 * 256) = 4.127 with double quantization (an 8-bit
  absmax per block of 64, an fp32 constant per 256 of those), 4 + 32/64 = 4.5 without.
- ``o``, optimizer state per trainable parameter: ``adamw`` 2 a (two moments in the parameter's
  dtype, as torch's AdamW keeps them: 8 for fp32), ``adamw_8bit`` and ``paged_adamw_8bit`` 2 (two
  8-bit moments; the paged one lives in memory the driver can evict to the CPU, counted here all
  the same), ``sgd`` 0 (no momentum).
- Full fine-tuning: fp32 weights 4 + fp32 gradients 4 + AdamW moments 8 = 16 bytes/param, 112 GB
  for 7B before activations. Mixed precision as in the ZeRO paper (bf16 weights 2 + bf16 gradients
  2 + fp32 master weights 4 + moments 8) comes to the same 16; ``weight_dtype`` plays no part.

Activations, for a Llama-style decoder layer (RMSNorm computed in fp32, fused attention, SwiGLU
MLP), per token, with ``c`` bytes per element of ``compute_dtype``, ``h`` hidden size, ``h_kv``
width of k and v, ``i`` intermediate size, ``r`` the LoRA rank:

    a_layer = 8 h                  the inputs of the two RMSNorms, upcast to fp32
            + c (2 h + 2 h_kv)     q, k, v and the attention output, kept by the fused kernel
                                   (sdpa / flash: no s x s score matrix); the output is o_proj's input
            + 3 c i                SwiGLU: gate (SiLU's input), SiLU(gate), up
            + inputs of the linear layers, kept for the weight gradients, one of:
              c (2 h + i)          shared: the two norm outputs (one for q/k/v, one for gate/up) and
                                   down_proj's input; full fine-tuning, and LoRA without dropout
                                   whose adapters compute in the activations' dtype (a = c)
              a sum(in)            LoRA otherwise: each adapted layer keeps its own input (a
                                   dropped-out copy, or the cast to the adapters' dtype); the dropout
                                   mask is not kept (backward draws it again; on the CPU a float
                                   base's fused LoRA layer keeps the dropped positions instead,
                                   4 p bytes per element, not counted); sum(in) adds the
                                   in_features of the adapted layers, 6 h + i for all linear ones
    full:   + 2 c h                the normalized input each RMSNorm weight needs for its gradient
    LoRA:   + a r per adapted layer           A x, kept for B's gradient

    a_head  = 4 h + 12 V           the final norm's fp32 input; cross-entropy keeps the fp32
                                   log-probabilities (4 V), and backward starts with two more fp32
                                   tensors of that size (their gradient, then the logits')
    full:   + 2 c h                the final norm's normalized input, lm_head's input

With ``gradient_checkpointing`` (one checkpoint per decoder layer, as transformers'
``gradient_checkpointing_enable``) a layer keeps only its input, ``L * c h``, and one layer's
activations are rebuilt at a time: ``tokens * (L * c h + a_layer + a_head)``. Against the bytes
autograd saves on an HF Llama (fp32 and bf16, full, LoRA, QLoRA) the formula is within 3%: it
ignores that the first layer's input needs no gradient. Eager attention also keeps the
``heads x seq_len`` attention probabilities per token and layer: use sdpa. Not counted: the
optimizer step's temporaries, a dequantized weight during a QLoRA matmul, the allocator's caching.

Given a module, the shapes are read from it: parameters, the linear layers (the adapters are
``r (in + out)`` per adapted layer, chosen by the rules of ``inject_adapters``) and ``h``, ``L``,
``i``, ``V``, ``h_kv`` from ``model.config``. Given a parameter count, a Llama shape fills in what
is not passed: ``h`` from ``n ~ 12 h^2 L`` with ``L ~ h / 128`` (Llama 7B-65B), i.e.
``h ~ (32 n / 3)^(1/3)`` rounded to 128; ``i = 8 h / 3``; ``V = 32000``; ``L`` from
``n = L (4 h^2 + 3 h i) + 2 V h``; attention without grouped queries (``h_kv = h``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .config import LoraConfig
from .inject import _find_targets, _unwrap, adapter_configs
from .modules import output_heads
from .quantize import is_quantized

METHODS = ("full", "lora", "qlora")
OPTIMIZER_STATES = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}  # by double_quant
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MemoryEstimate:
    """Estimated bytes of a training run, by part (see :mod:`lightning_peft.estimate`)."""

    method: str
    params: int
    trainable_params: int
    base_weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.base_weights + self.adapters + self.gradients + self.optimizer + self.activations

    def table(self) -> Table:
        table = Table(title=f"lightning-peft memory estimate ({self.method})",
                      caption=f"{self.params:,} params, {self.trainable_params:,} trainable", min_width=50)
        table.add_column("part")
        table.add_column("GB", justify="right")
        table.add_column("bytes", justify="right")
        for part in ("base_weights", "adapters", "gradients", "optimizer", "activations", "total"):
            table.add_row(part.replace("_", " "), f"{getattr(self, part) / 1e9:.2f}", f"{getattr(self, part):,}")
        return table


@dataclass
class _Shape:
    """What the estimate needs to know about the model (see the module docstring)."""

    params: int
    linear_params: int  # weights of the linear layers but the output head: what NF4 quantizes
    adapter_params: int  # sum of r (in + out) over the adapted layers
    adapted_layers: int
    adapted_inputs: int  # sum of in_features over the adapted layers
    hidden: int
    kv_hidden: int
    intermediate: int
    vocab: int
    layers: int


def estimate_memory(model_or_n_params: nn.Module | int, method: str = "qlora", *, r: int = 16,
                    target_modules: str | list[str] = "all-linear", trainable_fraction: float | None = None,
                    optimizer: str = "adamw", batch: int = 1, seq_len: int = 512,
                    hidden_size: int | None = None, num_layers: int | None = None,
                    intermediate_size: int | None = None, vocab_size: int | None = None,
                    weight_dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype = torch.bfloat16,
                    lora_dropout: float = 0.05, double_quant: bool = True, gradient_checkpointing: bool = False,
                    show: bool = True, console: Console | None = None) -> MemoryEstimate:
    """Bytes for base weights, adapters, gradients, optimizer state and activations of one
    training step; prints a rich table unless ``show=False``. Formulas: the module docstring.

    Args:
        model_or_n_params: the model as loaded (before ``quantize_base`` / ``inject_adapters``),
            or its parameter count.
        method: ``"full"``, ``"lora"`` (frozen base in ``weight_dtype``) or ``"qlora"`` (NF4 base).
        r, target_modules, lora_dropout: as in :class:`LoraConfig`. With a parameter count,
            ``target_modules`` is ``"all-linear"`` or a list of Llama projection names.
        trainable_fraction: trainable share of all parameters; overrides the adapter count.
        optimizer: one of ``"adamw"``, ``"adamw_8bit"``, ``"paged_adamw_8bit"``, ``"sgd"``.
        hidden_size, num_layers, intermediate_size, vocab_size: override the shapes read from
            ``model.config`` or guessed from the parameter count.
        weight_dtype: dtype of the frozen float weights (everything NF4 does not quantize).
        compute_dtype: dtype of the activations.
        double_quant: NF4 with quantized absmax constants (4.127 bits/param) or without (4.5).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {list(METHODS)}.")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r}: choose one of {list(OPTIMIZER_STATES)}.")
    for name, value in (("r", r), ("batch", batch), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r}: must be a positive int.")
    if trainable_fraction is not None and (method == "full" or not 0 < trainable_fraction <= 1):
        raise ValueError(f"trainable_fraction={trainable_fraction!r}: a number in (0, 1], for method "
                         f'"lora" or "qlora" (full fine-tuning trains every parameter).')
    given = dict(hidden=hidden_size, layers=num_layers, intermediate=intermediate_size, vocab=vocab_size)
    if isinstance(model_or_n_params, nn.Module):
        shape = _module_shape(model_or_n_params, r, target_modules, given)
    elif isinstance(model_or_n_params, int) and not isinstance(model_or_n_params, bool) and model_or_n_params > 0:
        shape = _count_shape(model_or_n_params, r, target_modules, given)
    else:
        raise ValueError(f"model_or_n_params={model_or_n_params!r}: pass an nn.Module or a positive "
                         f"parameter count (int).")

    w, c = weight_dtype.itemsize, compute_dtype.itemsize
    full = method == "full"
    a = w if method == "lora" else 4  # bytes of a trainable parameter (module docstring)
    if full:
        trainable, base = shape.params, 4 * shape.params
    else:
        trainable = (round(trainable_fraction * shape.params) if trainable_fraction is not None
                     else shape.adapter_params)
        base = w * shape.params if method == "lora" else round(
            shape.linear_params * NF4_BITS[double_quant] / 8 + w * (shape.params - shape.linear_params))
    optimizer_bytes = {"adamw": 2 * a, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}[optimizer]

    h, h_kv, i, L = shape.hidden, shape.kv_hidden, shape.intermediate, shape.layers
    per_layer = 8 * h + c * (2 * h + 2 * h_kv) + 3 * c * i
    if full or (lora_dropout == 0 and a == c):  # the linear layers' inputs are shared, as in the model
        per_layer += c * (2 * h + i)
    else:  # each adapter keeps its own copy of its input (no dropout mask: backward redraws it)
        per_layer += a * shape.adapted_inputs // L
    per_layer += 2 * c * h if full else a * r * shape.adapted_layers // L
    head = 4 * h + 12 * shape.vocab + (2 * c * h if full else 0)
    per_token = (L * c * h + per_layer if gradient_checkpointing else L * per_layer) + head

    estimate = MemoryEstimate(method=method, params=shape.params, trainable_params=trainable,
                              base_weights=base, adapters=0 if full else a * trainable,
                              gradients=a * trainable, optimizer=optimizer_bytes * trainable,
                              activations=batch * seq_len * per_token)
    if show:
        (console or Console()).print(estimate.table())
    return estimate


def _module_shape(model: nn.Module, r: int, target_modules, given: dict) -> _Shape:
    if adapter_configs(model) or any(is_quantized(m) for m in model.modules()):
        raise ValueError("estimate_memory reads the model as loaded: call it before quantize_base / "
                         "inject_adapters (or pass the parameter count).")
    params = sum(p.numel() for p in model.parameters())
    head_ids = output_heads(model)
    linear = [m for path, m in model.named_modules()  # what quantize_base quantizes: all but the head
              if type(m) is nn.Linear and id(m) not in head_ids and path.rsplit(".", 1)[-1] != "lm_head"]
    targets = [_unwrap(m) for _, m in _find_targets(model, LoraConfig(r=r, target_modules=target_modules))]
    config = getattr(model, "config", None)
    h, i, vocab, layers = _llama_dims(params, {key: given[key] or getattr(config, attr, None) for key, attr in (
        ("hidden", "hidden_size"), ("layers", "num_hidden_layers"),
        ("intermediate", "intermediate_size"), ("vocab", "vocab_size"))})
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv_hidden = kv_heads * (getattr(config, "head_dim", None) or h // heads) if heads else h
    return _Shape(params=params, linear_params=sum(m.weight.numel() for m in linear),
                  adapter_params=sum(r * sum(m.weight.shape) for m in targets), adapted_layers=len(targets),
                  # in_features: nn.Linear stores [out, in]; Conv1D and nn.Embedding store [in, out]
                  adapted_inputs=sum(m.weight.shape[1 if isinstance(m, nn.Linear) else 0] for m in targets),
                  hidden=h, kv_hidden=kv_hidden, intermediate=i, vocab=vocab, layers=layers)


def _count_shape(n_params: int, r: int, target_modules, given: dict) -> _Shape:
    h, i, vocab, layers = _llama_dims(n_params, given)
    projections = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
                   "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)
    if target_modules == "all-linear":
        names = LLAMA_PROJECTIONS
    elif isinstance(target_modules, (list, tuple)) and target_modules and set(target_modules) <= set(LLAMA_PROJECTIONS):
        names = tuple(target_modules)
    else:
        raise ValueError(f"target_modules={target_modules!r}: with a parameter count, use \"all-linear\" or a "
                         f"list from {list(LLAMA_PROJECTIONS)} (or pass the model to match its own names).")
    linear = layers * sum(a * b for a, b in projections.values())
    if linear > n_params:
        raise ValueError(f"hidden_size={h}, num_layers={layers}, intermediate_size={i} describe {linear:,} "
                         f"linear weights, more than the {n_params:,} parameters: fix the shapes or the count.")
    return _Shape(params=n_params, linear_params=linear,
                  adapter_params=layers * sum(r * sum(projections[n]) for n in names),
                  adapted_layers=layers * len(names), adapted_inputs=layers * sum(projections[n][0] for n in names),
                  hidden=h, kv_hidden=h, intermediate=i, vocab=vocab, layers=layers)


def _llama_dims(n_params: int, given: dict) -> tuple[int, int, int, int]:
    """``(hidden, intermediate, vocab, layers)``: the given ones, the rest from a Llama shape."""
    h = given["hidden"] or 128 * max(1, round((32 * n_params / 3) ** (1 / 3) / 128))
    i = given["intermediate"] or 8 * h // 3
    vocab = given["vocab"] or 32000
    layers = given["layers"] or max(1, round((n_params - 2 * vocab * h) / (4 * h * h + 3 * h * i)))
    return h, i, vocab, layers
