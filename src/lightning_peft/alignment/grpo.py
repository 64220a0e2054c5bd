r"""Group Relative Policy Optimization loss (Shao et al. 2024) with its common variants.

For ``G`` prompts with ``k = group_size`` sampled completions each (``B = G k`` rows, completion
tokens marked by ``mask: [B, T]``):

    advantage   A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)       (dr_grpo: no division)
    ratio       rho_t = exp(logp_t - old_logp_t)
    per token   l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * k3_t
    k3 KL       k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (>= 0, unbiased KL estimate)

and the loss aggregates ``l`` over completion tokens:

    grpo     mean over each sequence's tokens, then over sequences
    bnpo     sum over all tokens / number of completion tokens in the batch
    dr_grpo  sum over all tokens / (B * T)                (Dr. GRPO: no length or std bias)

``std`` is the unbiased standard deviation within each group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


class GRPOOutput(NamedTuple):
    loss: torch.Tensor
    advantages: torch.Tensor  # [B]
    kl: torch.Tensor  # scalar: mean k3 over completion tokens (0 when beta = 0 and no reference given)
    clip_fraction: torch.Tensor  # scalar: fraction of completion tokens whose ratio was clipped


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """``(r - mean_group) / (std_group + 1e-4)`` (or without the division), for ``[B]`` rewards."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}.")
    grouped = rewards.view(-1, group_size).float()
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              rewards: torch.Tensor, group_size: int, mask: torch.Tensor | None = None, epsilon: float = 0.2,
              beta: float = 0.0, loss_type: str = "grpo") -> GRPOOutput:
    """GRPO loss from per-token log-probabilities ``[B, T]`` (see the module docstring).

    ``old_logprobs`` are the sampling policy's (detached; equal to ``logprobs.detach()`` for a
    single update per batch), ``ref_logprobs`` the reference's (needed when ``beta > 0``),
    ``rewards: [B]`` one per completion, grouped by prompt in consecutive blocks of ``group_size``."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {list(GRPO_LOSS_TYPES)}.")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference policy's per-token log-probabilities).")
    mask = torch.ones_like(logprobs) if mask is None else mask.to(logprobs.dtype)
    advantages = group_advantages(rewards, group_size, scale=loss_type != "dr_grpo").to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.minimum(ratio * advantages[:, None], clipped * advantages[:, None])
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        delta = ref_logprobs.detach() - logprobs
        kl = torch.exp(delta) - delta - 1
        if beta > 0:
            per_token = per_token + beta * kl
    tokens = mask.sum().clamp_min(1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    else:
        loss = (per_token * mask).sum() / (per_token.shape[0] * per_token.shape[1])
    was_clipped = ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).to(mask.dtype)
    return GRPOOutput(loss, advantages.detach(), ((kl * mask).sum() / tokens).detach(),
                      ((was_clipped * mask).sum() / tokens).detach())
