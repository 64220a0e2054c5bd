"""Singular values of a LoRA update ``s B A`` from its factors, and the effective rank.

Light on imports (torch only): ``lightning-peft inspect`` uses it without loading Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .methods.lora import LoraLayer

TOP_VALUES_SHOWN = 5


def factor_singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ``scaling * B @ A`` (``A: [r, in]``, ``B: [out, r]``), descending, fp32,
    from two thin QR factorisations: the ``[out, in]`` product is never formed."""
    _, r_b = torch.linalg.qr(B.detach().float())
    _, r_a = torch.linalg.qr(A.detach().float().t())
    return abs(scaling) * torch.linalg.svdvals(r_b @ r_a.t())


def delta_singular_values(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    """Singular values of ``s B A`` for ``adapter_name`` of ``layer``, descending, ``[min(r, out, in)]`` fp32."""
    A, B = layer._factors(adapter_name)
    return factor_singular_values(A, B, layer.scaling[adapter_name])


def effective_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose top-``k`` squared singular values hold ``energy`` of their sum (0 if all are 0)."""
    power = sigma.double().pow(2)
    total = power.sum()
    if total == 0:
        return 0
    # the tolerance keeps an exact split (energy 0.75 of four equal values) at k=3, not 4
    return int((power.cumsum(0) < energy * total * (1 - 1e-9)).sum().item()) + 1
