"""A LoRA linear layer's training step as one autograd node (eager mode, float ``nn.Linear`` bases).

Autograd over the plain expression ``linear(x, W, b) + s * linear(linear(drop(x), A), B)`` records
five or six nodes per layer, keeps the dropped input for ``A``'s gradient, copies the base output
once more for the add, and sums ``x``'s gradient from two branches in a separate pass. What is
left when those go (docs/architecture.md, "The LoRA training step"):

    forward   out = x W^T + b;  h = drop(x) A^T;  out += s h B^T        (in place: out is ours)
    backward  g_h = s g B;  dB = s g^T h;  dA = g_h^T drop(x);
              dx = g W;  dx += drop(g_h A)                               (in place: dx is ours)

Saved for backward: ``x`` (which the previous layer's output already is: no new memory), ``h``
(``[tokens, r]``) and the weights; the dropout draw is replayed from the generator state recorded
at forward (:mod:`.dropout`), never stored. :meth:`LoraLayer.forward` takes this path only where it
computes the same thing as the plain expression: a float ``nn.Linear`` base with frozen weight and
bias and no hooks, an adapter without ``lora_bias``, matching dtypes and no autocast, outside
``torch.compile`` (the compiler fuses the plain expression itself). DoRA runs through the same node:
its column scale ``m / n`` is applied to the output and, in backward, to the incoming gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import AdapterDropout, apply_drop, device_generator, replay_generator


class FusedLoraLinear(torch.autograd.Function):
    """``x W^T + b + s (drop(x) A^T) B^T`` with a hand-written backward (see the module docstring);
    DoRA when ``magnitude`` is given: ``m / n * (x W^T + s (drop(x) A^T) B^T) + b`` with the row
    norms ``n = ||W + s B A||`` computed by the caller without gradient. ``dropout`` is an active
    :class:`AdapterDropout` (its unscaled draw; ``scaling`` then carries the ``1 / q``) or None."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, dropout: AdapterDropout | None,
                magnitude: torch.Tensor | None = None, norm: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, weight, bias if magnitude is None else None)
        ctx.positions = ctx.state = None
        if dropout is None:
            dropped = flat
        else:
            gaps = dropout.uses_gaps(flat)
            if not gaps:  # a mask as large as x: drawn again in backward, not kept
                ctx.state = device_generator(x.device).get_state()
            plan = dropout.plan(flat)
            dropped = apply_drop(plan, flat)
            if gaps:  # ~p * 4 bytes per element (int32 below 2**31 elements)
                ctx.positions = plan.to(torch.int32) if flat.numel() < 1 << 31 else plan
        shrunk = dropped.mm(A.t())
        out.addmm_(shrunk, B.t(), alpha=scaling)
        extra = ()
        if magnitude is not None:  # DoRA: scale the columns; the unscaled output is m's gradient's
            scale = (magnitude / norm.to(magnitude.dtype)).to(out.dtype)
            extra = (out, scale, norm)
            out = out * scale if bias is None else torch.addcmul(bias, out, scale)
        # dropped: x itself without dropout
        ctx.save_for_backward(dropped, weight, A, B, shrunk, *extra)
        ctx.scaling, ctx.dropout, ctx.x_shape = scaling, dropout, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        dropped, weight, A, B, shrunk, *extra = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _, _, need_m, _ = (*ctx.needs_input_grad, False, False)[:9]
        g = grad.reshape(-1, grad.shape[-1])
        dx = dA = dB = dm = None
        if extra:  # DoRA: m's gradient from the unscaled output, then the rest sees g * m / n
            unscaled, scale, norm = extra
            if need_m:
                dm = (g * unscaled).sum(0).div_(norm.to(g.dtype))
            g = g * scale
        if need_B:
            dB = shrunk.t().mm(g).t().mul_(ctx.scaling)
        if need_x or need_A:
            g_h = g.mm(B).mul_(ctx.scaling)
            if need_A:
                dA = g_h.t().mm(dropped)
            if need_x:
                if ctx.dropout is None:
                    dx = g.mm(weight).addmm_(g_h, A)
                else:  # the branch's input gradient, dropped where x was, then plus the base's
                    if ctx.positions is not None:
                        plan = ctx.positions.long()
                    else:
                        plan = ctx.dropout.plan(dropped, replay_generator(dropped.device, ctx.state))
                    dx = apply_drop(plan, g_h.mm(A), inplace=True).addmm_(g, weight)
                dx = dx.view(ctx.x_shape)
        return (dx, None, None, dA, dB, None, None, dm, None)[:len(ctx.needs_input_grad)]
