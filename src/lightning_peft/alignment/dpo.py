r"""Direct Preference Optimization loss (Rafailov et al. 2023) and IPO (Azar et al. 2023).

With sequence log-probabilities of the policy (``pc``, ``pr``) and the reference (``rc``, ``rr``) on
the chosen and rejected completions:

    h = (pc - pr) - (rc - rr)
    sigmoid:  loss = -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)   (eps: label smoothing)
    ipo:      loss = (h - 1 / (2 beta))^2
    rewards:  chosen = beta (pc - rc),  rejected = beta (pr - rr);  accuracy = mean(chosen > rejected)

Losses are averaged over the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")


class DPOOutput(NamedTuple):
    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B]
    accuracy: torch.Tensor  # scalar: fraction of pairs with chosen reward > rejected reward
    margin: torch.Tensor  # scalar: mean(chosen - rejected rewards)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> DPOOutput:
    """DPO / IPO loss from ``[B]`` sequence log-probabilities (see the module docstring)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {list(DPO_LOSS_TYPES)}.")
    if beta <= 0:
        raise ValueError(f"beta={beta}: must be > 0 (0.1 is the usual choice).")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: must be in [0, 0.5) (0 = plain DPO).")
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return DPOOutput(losses.mean(), chosen, rejected, (chosen > rejected).float().mean(), (chosen - rejected).mean())
