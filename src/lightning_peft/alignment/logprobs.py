r"""Log-probabilities of completions, and the reference model's for free.

For a causal LM with logits ``z: [B, T, V]`` over ``input_ids: [B, T]``, token ``t`` is predicted
at position ``t - 1``:

    logp[b, t] = log_softmax(z[b, t - 1])[input_ids[b, t]],      t = 1 .. T - 1

Only completion tokens count (``labels_mask[b, t] == 1``; prompt and padding are 0):

    sum_b  = sum_t logp[b, t] * mask[b, t]        mean_b = sum_b / sum_t mask[b, t]

With adapters, the reference policy of DPO/GRPO is the same model with its adapters switched off
(:func:`lightning_peft.disable_adapters`): no second copy of the weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..inject import disable_adapters, use_adapter


class SequenceLogprobs(NamedTuple):
    sum: torch.Tensor  # [B] summed log-probabilities of the completion tokens
    mean: torch.Tensor  # [B] the same divided by the number of completion tokens
    tokens: torch.Tensor  # [B, T-1] per-token log-probabilities (0 outside the completion)
    mask: torch.Tensor  # [B, T-1] the completion mask aligned with ``tokens``


def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``model(input_ids=..., attention_mask=...)`` as a logits tensor (``.logits`` if present)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return getattr(out, "logits", out)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels_mask: torch.Tensor) -> SequenceLogprobs:
    """Summed and mean log-probabilities of the completion tokens of each sequence.

    Args:
        model: a causal LM, ``model(input_ids=..., attention_mask=...) -> logits [B, T, V]`` (or an
            output with ``.logits``).
        input_ids: ``[B, T]`` prompt + completion (+ padding).
        attention_mask: ``[B, T]`` 1 for real tokens, or None.
        labels_mask: ``[B, T]`` 1 on completion tokens (the ones whose probability counts).
    """
    logits = logits_of(model, input_ids, attention_mask)[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = labels_mask[:, 1:].to(logits.dtype)
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    total = token_logps.sum(-1)
    return SequenceLogprobs(total, total / mask.sum(-1).clamp_min(1.0), token_logps, mask)


@torch.no_grad()
def reference_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       labels_mask: torch.Tensor, reference_adapter: str | None = None) -> SequenceLogprobs:
    """:func:`sequence_logprobs` of the reference policy, without gradients.

    The reference is the base model (adapters disabled), or, with ``reference_adapter``, that named
    adapter (e.g. the already-trained adapter the policy started from, loaded a second time and kept
    frozen). Either way no second copy of the base weights exists."""
    if reference_adapter is None:
        with disable_adapters(model):
            return sequence_logprobs(model, input_ids, attention_mask, labels_mask)
    with use_adapter(model, reference_adapter):
        return sequence_logprobs(model, input_ids, attention_mask, labels_mask)
