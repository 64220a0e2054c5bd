"""DPO / IPO / GRPO losses against float64 hand computations; the reference policy for free."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_peft as lp
from conftest import tiny_llama, token_batch
from lightning_peft.alignment import dpo_loss, grpo_loss, reference_logprobs, sequence_logprobs

G = torch.Generator().manual_seed(0)


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=G) * scale).double()


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_matches_hand_computation(loss_type, smoothing):
    pc, pr, rc, rr = (_rand(16, scale=5.0) for _ in range(4))
    beta = 0.3
    out = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=beta, label_smoothing=smoothing,
                   loss_type=loss_type)
    losses, chosen, rejected = [], [], []
    for i in range(16):
        h = (pc[i] - pr[i] - rc[i] + rr[i]).item()
        if loss_type == "sigmoid":
            losses.append(-(1 - smoothing) * _logsigmoid(beta * h) - smoothing * _logsigmoid(-beta * h))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
        chosen.append(beta * (pc[i] - rc[i]).item())
        rejected.append(beta * (pr[i] - rr[i]).item())
    assert abs(out.loss.item() - sum(losses) / 16) <= 1e-6 * max(1.0, abs(sum(losses) / 16))
    assert torch.allclose(out.chosen_rewards.double(), torch.tensor(chosen, dtype=torch.float64), atol=1e-6)
    assert abs(out.accuracy.item() - sum(c > r for c, r in zip(chosen, rejected)) / 16) <= 1e-6


def _grpo_reference(logp, old, ref, rewards, k, mask, eps, beta, loss_type):
    """Plain-Python float64 GRPO, token by token."""
    B, T = logp.shape
    adv = []
    for g in range(B // k):
        group = [rewards[g * k + j].item() for j in range(k)]
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        adv += [(x - mean) / (std + 1e-4) if loss_type != "dr_grpo" else x - mean for x in group]
    per_token = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            ratio = math.exp(logp[b, t].item() - old[b, t].item())
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            value = -min(ratio * adv[b], clipped * adv[b])
            if beta > 0:
                d = ref[b, t].item() - logp[b, t].item()
                value += beta * (math.exp(d) - d - 1)
            per_token[b][t] = value * mask[b, t].item()
    if loss_type == "grpo":
        return sum(sum(row) / max(mask[b].sum().item(), 1) for b, row in enumerate(per_token)) / B
    if loss_type == "bnpo":
        return sum(map(sum, per_token)) / mask.sum().item()
    return sum(map(sum, per_token)) / (B * T)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_matches_hand_computation(loss_type, beta):
    B, T, k = 8, 6, 4
    logp = _rand(B, T, scale=0.5) - 2
    old = logp + _rand(B, T, scale=0.3)  # ratios on both sides of the clip range
    ref = logp + _rand(B, T, scale=0.3)
    rewards = _rand(B)
    mask = (torch.rand(B, T, generator=G) > 0.25).double()
    out = grpo_loss(logp.float(), old.float(), ref.float(), rewards.float(), group_size=k, mask=mask.float(),
                    epsilon=0.2, beta=beta, loss_type=loss_type)
    expected = _grpo_reference(logp, old, ref, rewards, k, mask, 0.2, beta, loss_type)
    assert abs(out.loss.item() - expected) <= 1e-6
    assert 0.0 < out.clip_fraction.item() < 1.0


def test_bad_loss_arguments_name_the_choices():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="'sigmoid', 'ipo'"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dr_grpo'"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, x, group_size=2, loss_type="ppo")
    with pytest.raises(ValueError, match="groups of group_size=3"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, x, group_size=3)


def test_sequence_logprobs_counts_completion_tokens_only():
    model = tiny_llama()
    ids = token_batch(batch=2, seq=10)
    mask = torch.zeros_like(ids)
    mask[:, 6:] = 1  # the last 4 tokens are the completion
    out = sequence_logprobs(model, ids, None, mask)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    expected = sum(logp[:, t - 1].gather(-1, ids[:, t:t + 1]).squeeze(-1) for t in range(6, 10))
    assert torch.allclose(out.sum.double(), expected, atol=1e-5)
    assert torch.allclose(out.mean.double(), expected / 4, atol=1e-5)


def test_reference_logprobs_are_the_base_models_and_share_its_weights():
    base = tiny_llama()
    ids = token_batch(batch=2, seq=10)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = sequence_logprobs(base, ids, None, mask).sum
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, init_lora_weights=False, lora_dropout=0.0))
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not torch.equal(sequence_logprobs(model, ids, None, mask).sum, expected)  # the policy differs
    reference = reference_logprobs(model, ids, None, mask)
    assert torch.equal(reference.sum, expected) and not reference.sum.requires_grad
    # one copy of the base: parameter count = base + adapters, no new storage appeared
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters()) + adapters
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == storages


def test_reference_can_be_a_frozen_starting_adapter():
    """A policy that starts from a trained adapter: the reference is that adapter, loaded twice."""
    ids = token_batch(batch=2, seq=10)
    mask = torch.ones_like(ids)
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, init_lora_weights=False), "reference")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".reference" in n}
    lp.inject_adapters(model, lp.LoraConfig(r=4), "policy")
    with torch.no_grad():
        for name, tensor in start.items():
            dict(model.named_parameters())[name.replace(".reference", ".policy")].copy_(tensor)
    model.eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".policy" in n for n in trainable)
    assert torch.equal(reference_logprobs(model, ids, None, mask, reference_adapter="reference").sum,
                       sequence_logprobs(model, ids, None, mask).sum.detach())
