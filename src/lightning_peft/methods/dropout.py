"""Adapter dropout: PEFT's semantics (an ``nn.Dropout`` on the adapter branch's input), drawn cheaply.

The mask is i.i.d. Bernoulli: each element is kept with probability ``q = 1 - p``, independently of
every other element, layer and step; ``p`` is rounded to a multiple of 1/65536 (at least that),
so ``q`` is within ``2**-17`` of ``1 - p`` and the scale ``1 / q`` uses that exact ``q``. Two ways
to draw it, chosen per call (docs/architecture.md, "Adapter dropout"):

- **gaps** (CPU, ``p <= 0.125``): the positions of the *dropped* elements. In a Bernoulli sequence
  the runs of kept elements before each drop are i.i.d. geometric, so ``G = floor(log V /
  log(1 - p))`` from one uniform ``V`` (32 random bits) per *dropped* element, summed, gives every
  dropped position (each gap's law exact to ~2**-24). At ``p = 0.05`` that is 32 bits per 20
  elements, and the dropped input is a copy of ``x`` with ~5% of it zeroed: no mask tensor at all.
- **bits** (elsewhere): 16 random bits per element, four elements per 64-bit word of the
  generator, compared with a threshold straight into ``x``'s dtype. ``torch.rand`` spends a 32-bit
  draw and a float conversion per element, ``nn.Dropout``'s ``bernoulli_`` more.

Both come from the global torch generator of ``x``'s device: the same RNG state gives the same
masks (exact resume; :meth:`AdapterDropout.mask` gives the mask a state draws), and every layer and
step draws fresh ones. Inside ``torch.compile`` the gaps draw is one opaque op returning a bool
mask (``lightning_peft::gap_keep_mask``); elsewhere the mask is ``rand >= p``, which the compiler
fuses into its kernel. :meth:`AdapterDropout.drop` keeps neither draw for backward: backward
draws it again from the generator state recorded at forward (:class:`_RedrawnDrop`), so it adds
no activation memory. The fused LoRA node (:mod:`.fused`) keeps the gaps draw's positions instead
(int32, ``4 p`` bytes per element: cheaper than drawing again) and redraws a bits mask. :class:`~lightning_peft.methods.lora.LoraLayer` applies the unscaled
drop and folds ``1 / q`` into the adapter's scaling.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

# p is rounded to a multiple of 1/65536 (the bits draw reads 16-bit lanes; the gaps draw uses the same p)
_MASK_LEVELS = 1 << 16
# the gaps draw costs ~p draws per element where the bits draw costs 1/4: at p = 0.125 they measured even
_GAPS_MAX_P = 0.125
# the gaps draw takes this many standard deviations of the drop count spare, so that one call almost always suffices
_SPARE_SD = 6.0
_SALTS = itertools.count()


class AdapterDropout(nn.Module):
    """Inverted dropout of the adapter branch's input: ``x * keep / q`` with ``keep ~ Bernoulli(q)``
    drawn independently per element, ``q = 1 - p`` (see the module docstring for how it is drawn)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        # tells this module's compiled draws apart from its siblings' (no CSE); a tensor, not an int,
        # so that torch.compile neither specializes on it nor recompiles per module
        self.register_buffer("_salt", torch.tensor(next(_SALTS)), persistent=False)

    def _threshold(self) -> int:
        return min(max(1, round(self.p * _MASK_LEVELS)), _MASK_LEVELS - 1)

    def keep_probability(self) -> float:
        """``q``: the probability that an element is kept, ``1 - p`` rounded to a multiple of 1/65536."""
        return 1.0 - self._threshold() / _MASK_LEVELS

    def active(self) -> bool:
        """Whether a call drops anything: in training mode with ``p > 0`` (``alignment.disable_dropout``
        sets ``p = 0``)."""
        return self.training and self.p > 0

    def uses_gaps(self, x: torch.Tensor) -> bool:
        """Whether eager calls on tensors like ``x`` draw the dropped positions (else a bits mask)."""
        return x.device.type == "cpu" and self._threshold() <= _GAPS_MAX_P * _MASK_LEVELS

    def positions(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The ascending flat indices (int64, CPU) of the elements dropped among ``n``: geometric gaps
        between drops, 32 random bits per drop (see :func:`drop_positions`)."""
        return drop_positions(n, self._threshold(), generator)

    def plan(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw for a tensor shaped like ``x``: the dropped flat positions (int64), or a keep mask
        (0/1 in ``x``'s dtype; bool from the compiled gaps op); :func:`apply_drop` applies it."""
        compiling = torch.compiler.is_compiling()
        if compiling and self.uses_gaps(x):  # an opaque op: no per-element rand
            return torch.ops.lightning_peft.gap_keep_mask(x, self._threshold(), self._salt)
        if compiling or x.device.type not in ("cpu", "cuda"):
            return (torch.rand(x.shape, device=x.device, generator=generator)
                    >= self._threshold() / _MASK_LEVELS).to(x.dtype)
        if self.uses_gaps(x):
            return self.positions(x.numel(), generator)
        n, t = x.numel(), self._threshold()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(1 << 63), None, generator=generator)
        keep = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return torch.ge(words.view(torch.int16)[:n].view(x.shape), t - _MASK_LEVELS // 2, out=keep)

    def mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The 0/1 keep mask (``x``'s shape and dtype, unscaled) that a call on ``x`` would draw from
        ``generator`` (default: the global generator of ``x``'s device)."""
        plan = self.plan(x, generator)
        return apply_drop(plan, torch.ones(x.shape, dtype=x.dtype, device=x.device), inplace=True)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """``x * mask`` (a new tensor), unscaled. When ``x`` needs a gradient the draw is not kept for
        backward: backward draws it again from the generator state recorded here (a few bytes to
        5 KB per call instead of a mask as large as ``x``)."""
        if not x.requires_grad or torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
            return apply_drop(self.plan(x), x)
        return _RedrawnDrop.apply(x, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return x
        return self.drop(x).mul_(1.0 / self.keep_probability())

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_positions(n: int, threshold: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The ascending flat indices (int64, CPU) of the elements dropped among ``n`` at
    ``p = threshold / 65536``: geometric gaps between drops, 32 random bits per drop (plus ~6
    standard deviations spare, drawn in the same call; a shortfall draws again from where it
    stopped)."""
    p = threshold / _MASK_LEVELS
    inv_log_q = 1.0 / math.log1p(-p)
    parts, start = [], 0  # start: the first index not yet decided
    while True:
        mean = (n - start) * p
        k = max(16, int(mean + _SPARE_SD * math.sqrt(mean) + 16))
        words = torch.empty((k + 1) // 2, dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
        # V uniform in (0, 1) from 32 bits (float32: each gap's law is exact to ~2**-24);
        # floor(log V / log q) is the number of kept elements before the next drop
        v = words.view(torch.int32)[:k].to(torch.float32).mul_(2.0 ** -32).add_(0.5).clamp_(min=2.0 ** -33)
        at = v.log_().mul_(inv_log_q).floor_().to(torch.int64).add_(1).cumsum_(0).add_(start - 1)
        last = int(at[-1])
        if last >= n:
            parts.append(at[: int(torch.searchsorted(at, n))])
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        parts.append(at)
        start = last + 1


# Under torch.compile the gaps draw is one opaque op that returns the keep mask (bool, so that
# autograd keeps 1 byte per element, as for a compiled rand mask): the compiler would otherwise
# draw a random number per element. ``salt`` is a different tensor per module, so that siblings fed
# the same input are not merged into one draw by common-subexpression elimination.
@torch.library.custom_op("lightning_peft::gap_keep_mask", mutates_args=(), device_types="cpu")
def _gap_keep_mask(x: torch.Tensor, threshold: int, salt: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(x.shape, dtype=torch.bool)
    keep.view(-1).index_fill_(0, drop_positions(x.numel(), threshold), False)
    return keep


@_gap_keep_mask.register_fake
def _(x: torch.Tensor, threshold: int, salt: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


def apply_drop(plan: torch.Tensor, t: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``t`` with the elements ``plan`` drops zeroed: a new tensor, or ``t`` itself (contiguous) when
    ``inplace``."""
    if plan.dtype == torch.int64:  # flat positions of the dropped elements
        out = t if inplace else t.clone(memory_format=torch.contiguous_format)
        out.view(-1).index_fill_(0, plan, 0)
        return out
    return t.mul_(plan) if inplace else t * plan


def device_generator(device: torch.device) -> torch.Generator:
    """The global generator of ``device`` (what ``torch.rand(..., device=device)`` draws from)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def replay_generator(device: torch.device, state: torch.Tensor) -> torch.Generator:
    """A private generator at ``state`` (one recorded from :func:`device_generator` before a draw)."""
    generator = torch.Generator(device=device)
    generator.set_state(state)
    return generator


class _RedrawnDrop(torch.autograd.Function):
    """``x * mask`` whose backward draws the mask again from the generator state it started from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dropout: AdapterDropout) -> torch.Tensor:
        ctx.state = device_generator(x.device).get_state()
        ctx.dropout = dropout
        return apply_drop(dropout.plan(x), x)  # advances the global generator as a plain draw would

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.dropout.plan(grad, replay_generator(grad.device, ctx.state))
        return apply_drop(plan, grad), None


# every dropout module kind: torch's (nn.Dropout, Dropout1d/2d/3d, AlphaDropout) and the adapters'
DROPOUT_TYPES = (nn.modules.dropout._DropoutNd, AdapterDropout)
