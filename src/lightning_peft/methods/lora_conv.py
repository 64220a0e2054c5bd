r"""LoRA and DoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (HF PEFT's tensor layout).

For a base convolution ``W: [out, in/g, *k]`` (``g`` groups) the adapter is two convolutions:

    lora_A: in -> r, the base's kernel, stride, padding, dilation and padding mode (groups 1)
    lora_B: r -> out, a 1x1 convolution with the base's ``groups``
    y = conv(x; W) + b + s * lora_B(lora_A(drop(x)))

``r`` must be a multiple of ``groups`` (lora_B is grouped). PEFT builds ``lora_A`` without the
base's dilation and padding mode; here they are copied, so a dilated or reflect-padded base gets an
adapter whose output lines up with the base's (same tensors, same file; PEFT's own layer fails on a
dilated base). With ``groups = 1`` the adapter is the weight update

    dW = s * reshape(B[out, r] @ A[r, in * prod(k)], W.shape)

so merging is exact (``W <- W + dW``). With ``groups > 1`` ``lora_A`` mixes every input channel
into every group while ``W`` is block-diagonal, so no grouped weight equals the adapted layer:
merging is refused (as in PEFT) and the adapter stays a separate branch.

DoRA: ``y = m / n * (conv(x; W) + s * lora) + b`` with ``m: [1, out, 1, ...]`` (PEFT's file shape)
and ``n`` the detached norm of ``W + dW`` over everything but the output channel. For
``groups > 1`` ``n`` uses PEFT's formula (``B`` viewed as ``[-1, r]`` times ``A`` viewed as
``[r, -1]``, reshaped to ``W``'s shape), so a DoRA adapter computes the same numbers here and in PEFT.

bitsandbytes has no 4-bit convolution: under ``quantize_base`` / ``strategy="qlora"`` convolutions
keep their float weight, and their adapters train on it (see docs/lora.md).

Mixed-adapter batches: the rows are split by adapter; each group runs its adapter's branch (and
DoRA scale) on its rows; rows of the base or of an adapter this layer lacks get the base output.
"""

from __future__ import annotations


import torch
from torch import nn

from .base import AdapterModule
from .lora import AdapterDropout, LoraLayer, init_lora_factors, lora_scaling

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv(module: nn.Module) -> bool:
    """Whether LoRA's conv layer can wrap ``module`` (an ``nn.Conv1d/2d/3d``, not transposed)."""
    return isinstance(module, CONV_TYPES)


class LoraConvLayer(LoraLayer):
    """A frozen ``nn.Conv1d/2d/3d`` plus named LoRA/DoRA adapters (see the module doc).

    The weight views of :class:`LoraLayer` see the kernel flattened to ``[out, in/g * prod(k)]``,
    so merging, DoRA norms and the rank monitor work on it as on a linear weight."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        AdapterModule.__init__(self)
        if not is_conv(base_layer):
            raise TypeError(f"LoraConvLayer wraps nn.Conv1d/2d/3d, not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.kind = "conv"
        self.quantized = False  # bitsandbytes has no 4-bit convolution: the base stays float
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.transposed = False
        self._init_stores()

    @property
    def groups(self) -> int:
        return self.base_layer.groups

    # ------------------------------------------------------------------------------- weights
    def base_weight(self) -> torch.Tensor:
        """The kernel as ``[out, in/g * prod(k)]`` (a view)."""
        return self.base_layer.weight.flatten(1)

    def set_base_weight(self, new_weight: torch.Tensor) -> None:
        """Write ``new_weight`` (``[out, in/g * prod(k)]`` or the kernel's shape) into the kernel in place."""
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(new_weight.reshape(weight.shape))

    def stored_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A ``[out, in/g * prod(k)]`` view back in the kernel's own shape."""
        return weight.reshape(self.base_layer.weight.shape)

    def kind_refusal(self, name: str) -> str | None:
        if self.groups > 1:
            return (f"{type(self.base_layer).__name__}(groups={self.groups}) cannot take LoRA adapter {name!r} into its "
                    f"weight: lora_A mixes all input channels into every group, which a grouped kernel cannot hold "
                    f"(PEFT refuses this too). Keep the adapter unmerged, or exclude this layer before training.")
        return None

    # ------------------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    init_lora_weights: bool | str = True, lora_bias: bool = False) -> None:
        if name in self.scaling:
            raise ValueError(f"adapter {name!r} already exists on this layer; choose another adapter_name.")
        base = self.base_layer
        if r % base.groups:
            raise ValueError(f"rank r={r} on {type(base).__name__}(groups={base.groups}): the rank must be a multiple of "
                             f"groups (lora_B is a grouped 1x1 convolution, as in PEFT). Pick r={base.groups * max(1, r // base.groups)} "
                             f"(rank_pattern can set it for this layer) or exclude the layer.")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not available on convolutions; use True, False "
                             f"or 'gaussian'.")
        if lora_bias and use_dora:
            raise ValueError("lora_bias=True works without DoRA (as in PEFT); set use_dora=False.")
        weight = base.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        conv = type(base)
        ones = (1,) * (weight.dim() - 2)
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                                 bias=False, padding_mode=base.padding_mode, **factory)
        self.lora_B[name] = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=lora_bias, **factory)
        self.lora_dropout[name] = AdapterDropout(lora_dropout).to(factory["device"]) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_scaling(lora_alpha, r, use_rslora)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            init_lora_factors(A, B, init_lora_weights, r)
            if lora_bias:
                nn.init.zeros_(self.lora_B[name].bias)
        if use_dora:
            with torch.no_grad():
                norm = self.dora_row_norm(name)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(weight.dtype).view(self._channel_shape()))

    def _channel_shape(self) -> tuple[int, ...]:
        """``(1, out, 1, ...)``: a per-output-channel tensor broadcast over an output batch."""
        return (1, -1) + (1,) * (self.base_layer.weight.dim() - 2)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: [r, in * prod(k)], B: [out, r])`` with ``s B A`` the adapter's dense update (every input
        channel to every output channel). Views of the stored tensors for groups 1; for groups > 1
        ``B`` is the grouped ``[out, r / g]`` laid out block-diagonally (a new tensor)."""
        A, B = self.lora_A[name].weight.flatten(1), self.lora_B[name].weight.flatten(1)
        if self.groups > 1:
            B = torch.block_diag(*B.reshape(self.groups, self.out_features // self.groups, -1).unbind(0))
        return A, B

    def delta_weight(self, name: str) -> torch.Tensor:
        """``dW`` as ``[out, in * prod(k)]`` in at least fp32 (groups 1; see :meth:`kind_refusal`)."""
        if self.groups > 1:
            raise RuntimeError(self.kind_refusal(name))
        return self._dora_delta(name)

    def _dora_delta(self, name: str) -> torch.Tensor:
        """``s * B.view(-1, r) @ A.view(r, -1)`` reshaped to ``[out, in/g * prod(k)]`` (PEFT's DoRA
        formula: the true update for groups 1)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        r = A.shape[0]
        dtype = torch.promote_types(A.dtype, torch.float32)
        delta = B.to(dtype).reshape(-1, r) @ A.to(dtype).reshape(r, -1)
        return self.scaling[name] * delta.reshape(self.out_features, -1)

    def dora_row_norm(self, name: str) -> torch.Tensor:
        delta = self._dora_delta(name)
        return torch.linalg.vector_norm(self.base_weight().to(delta.dtype) + delta, dim=1)

    def dora_magnitude(self, name: str) -> torch.Tensor:
        """The DoRA magnitude as ``[out]``."""
        return self.lora_magnitude_vector[name].reshape(-1)

    # ------------------------------------------------------------------------------- forward
    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``lora_B(lora_A(drop(x)))`` (with lora_B's bias, unscaled)."""
        A = self.lora_A[name]
        return self.lora_B[name](A(self.lora_dropout[name](x).to(A.weight.dtype)))

    def _apply_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora = self._branch(name, x).to(result.dtype)
        if name not in self.lora_magnitude_vector:
            return torch.add(result, lora, alpha=self.scaling[name])
        with torch.no_grad():
            norm = self.dora_row_norm(name)
        magnitude = self.lora_magnitude_vector[name]
        scale = (magnitude / norm.to(magnitude.dtype).view(self._channel_shape())).to(result.dtype)
        bias = self.base_layer.bias
        bias = None if bias is None else bias.view(self._channel_shape())
        out = result if bias is None else result - bias
        out = torch.add(out, lora, alpha=self.scaling[name]) * scale
        return out if bias is None else out + bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None and not self.disabled:
            return self._mixed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disabled or name is None or name not in self.scaling or name in self.merged:
            return result
        return self._apply_adapter(name, x, result)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Row ``n`` of the batch through adapter ``row_adapters[n]``: rows grouped by adapter."""
        ids = self.row_adapters
        if x.shape[0] != len(ids):
            raise ValueError(f"adapter_ids gave {len(ids)} ids, but this {type(self.base_layer).__name__} got a batch of "
                             f"{x.shape[0]} rows (input {tuple(x.shape)}); give one id per row of the batch.")
        result = self.base_layer(x, *args, **kwargs)
        rows_of: dict[str, list[int]] = {}
        for row, name in enumerate(ids):
            if name in self.scaling and name not in self.merged:
                rows_of.setdefault(name, []).append(row)
        if not rows_of:
            return result
        out = result.clone()
        for name, rows in rows_of.items():
            index = torch.tensor(rows, device=x.device)
            out = out.index_copy(0, index, self._apply_adapter(name, x.index_select(0, index),
                                                               result.index_select(0, index)))
        return out

    def clear_stack_cache(self) -> None:
        self._stack_cache = None
