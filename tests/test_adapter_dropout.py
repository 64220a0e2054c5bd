"""Adapter dropout's cheap mask (AdapterDropout): keep rate, independence, unbiasedness, exact resume,
and the LoRA layer's use of it (mask unscaled, 1/q folded into the scaling) against float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_peft as lp
from conftest import rel_err, tiny_llama
from lightning_peft.methods import LoraLayer
from lightning_peft.methods import dropout as dropout_module
from lightning_peft.methods.dropout import AdapterDropout, apply_drop


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_rate_is_one_minus_p(p):
    """2**21 elements: the kept fraction is within 5 standard errors of q, and q within 2**-17 of 1 - p."""
    drop = AdapterDropout(p).train()
    q = drop.keep_probability()
    assert abs(q - (1 - p)) <= 2 ** -17
    torch.manual_seed(0)
    mask = drop.mask(torch.empty(512, 4096))
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, 1.0}
    n = mask.numel()
    assert abs(mask.mean().item() - q) <= 5 * math.sqrt(q * (1 - q) / n)
    # bf16 masks come out in bf16, same rate
    half = drop.mask(torch.empty(256, 1024, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert abs(half.float().mean().item() - q) <= 5 * math.sqrt(q * (1 - q) / half.numel())


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_masks_are_independent_within_a_draw_across_calls_and_layers(p):
    """Neighbouring elements (which share a random 64-bit word, or a gap), two calls (steps) and two
    modules (layers) give uncorrelated masks: |corr| below 5/sqrt(n). p=0.05 draws gaps, 0.3 bits."""
    torch.manual_seed(1)
    a, b = AdapterDropout(p).train(), AdapterDropout(p).train()
    assert a.uses_gaps(torch.empty(1)) == (p < 0.1)
    x = torch.empty(256, 2048)
    m1, m2, m3 = a.mask(x), a.mask(x), b.mask(x)
    n = x.numel()
    bound = 5 / math.sqrt(n)
    flat = m1.flatten()
    for lag in (1, 2, 3, 4):  # lanes of one word, and the next word
        assert abs(_corr(flat[:-lag], flat[lag:])) < bound * 1.01
    assert abs(_corr(m1, m2)) < bound and abs(_corr(m1, m3)) < bound and not torch.equal(m1, m2)


def test_forward_is_unbiased_inverted_dropout():
    drop = AdapterDropout(0.25).train()
    torch.manual_seed(2)
    x = torch.randn(64, 1024)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    kept = drop.mask(x).bool()
    q = drop.keep_probability()
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert torch.allclose(y[kept], x[kept] / q, rtol=1e-6, atol=0)
    ones = drop(torch.ones(1024, 1024))
    assert abs(ones.mean().item() - 1) <= 5 * math.sqrt((1 - q) / q / ones.numel())
    assert torch.equal(drop.eval()(x), x) and torch.equal(AdapterDropout(0.0).train()(x), x)


def test_lora_layer_with_dropout_matches_float64_and_same_rng_state_gives_same_output():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(32, 24))
    layer.add_adapter("a", r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False)
    layer.active_adapter = "a"
    layer.train()
    x = torch.randn(3, 50, 32)
    state = torch.get_rng_state()
    out = layer(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in (layer.lora_A["a"].weight, layer.lora_B["a"].weight)]
    torch.set_rng_state(state)  # resume: the same generator state draws the same masks
    mask = layer.lora_dropout["a"].mask(x)
    q = layer.lora_dropout["a"].keep_probability()
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    reference = x.double() @ W.T + b + layer.scaling["a"] * ((x.double() * mask.double() / q) @ A.T @ B.T)
    assert rel_err(out, reference) <= 1e-6
    torch.set_rng_state(state)
    for p in layer.parameters():
        p.grad = None
    again = layer(x)
    again.square().sum().backward()
    assert torch.equal(again, out)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, (layer.lora_A["a"].weight, layer.lora_B["a"].weight)))


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_dropout_scale_with_dora_and_lora_bias(kind):
    """DoRA takes s / q on the dropped branch; lora_bias keeps its bias unscaled by 1/q."""
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(16, 8))
    layer.add_adapter("a", r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False, use_dora=kind == "dora")
    if kind == "lora_bias":
        layer.lora_B["a"].bias = nn.Parameter(torch.randn(8))
    layer.active_adapter = "a"
    layer.train()
    x = torch.randn(40, 16)
    torch.manual_seed(4)
    out = layer(x)
    torch.manual_seed(4)
    dropped = layer.lora_dropout["a"](x)  # the same mask, scaled by 1/q
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    s = layer.scaling["a"]
    if kind == "dora":
        m = layer.lora_magnitude_vector["a"].double()
        V = W + s * B @ A
        reference = (x.double() @ W.T + s * dropped.double() @ A.T @ B.T) * (m / V.norm(dim=1)) + b
    else:
        reference = x.double() @ W.T + b + s * (dropped.double() @ A.T @ B.T + layer.lora_B["a"].bias.double())
    assert rel_err(out, reference) <= 1e-6


@pytest.mark.parametrize("p", [0.05, 0.3])  # the gaps draw (through the fused node), the bits draw
def test_model_layers_draw_independent_masks_and_resume_exactly(monkeypatch, p):
    """In a model every adapted layer draws its own mask (q and k see the same input, not the same
    mask), each step draws new ones, and restoring the RNG state replays a step bit for bit."""
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, lora_dropout=p, target_modules=["q_proj", "k_proj"]))
    model.train()
    masks = []
    original = AdapterDropout.plan

    def record(self, x, generator=None):
        plan = original(self, x, generator)
        masks.append(apply_drop(plan, torch.ones_like(x), inplace=True))
        return plan

    monkeypatch.setattr(AdapterDropout, "plan", record)
    ids = torch.randint(0, 128, (4, 32))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = model(input_ids=ids).logits
    step1 = list(masks)
    assert len(step1) == 4  # 2 layers x (q, k)
    q_mask, k_mask = step1[0], step1[1]
    assert abs(_corr(q_mask, k_mask)) < 5 / math.sqrt(q_mask.numel())
    masks.clear()
    model(input_ids=ids)
    assert not any(torch.equal(a, b) for a, b in zip(step1, masks))
    masks.clear()
    torch.set_rng_state(state)
    replay = model(input_ids=ids).logits
    assert all(torch.equal(a, b) for a, b in zip(step1, masks)) and torch.equal(first, replay)


def test_backward_redraws_the_forward_mask_and_saves_no_mask():
    """Backward multiplies by the same mask as forward although other draws happened in between,
    and nothing mask-sized is saved for it (tensors saved by the dropped product: none)."""
    from lightning_peft.methods.base import AdapterDropout

    dropout = AdapterDropout(0.3).train()
    x = (torch.rand(64, 48, dtype=torch.float64) + 0.5).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout.drop(x)
    torch.rand(1000)  # the global generator moves on before backward
    (y * 2).sum().backward()
    kept = (y != 0).to(x.dtype)
    assert 0.6 < kept.mean() < 0.8
    torch.testing.assert_close(x.grad, 2 * kept, rtol=0, atol=0)
    assert not any(t.numel() == x.numel() for t in saved), [t.shape for t in saved]


@pytest.mark.parametrize("spare_sd", [6.0, -3.0])
def test_gap_positions_are_bernoulli_also_when_a_draw_falls_short(monkeypatch, spare_sd):
    """The gaps draw: ascending positions below n; the dropped count per block of 4096 has the binomial
    mean and variance; the first and the last elements are dropped at rate p. With spare_sd=-3 the
    first draw almost always falls short and the loop draws again from where it stopped."""
    monkeypatch.setattr(dropout_module, "_SPARE_SD", spare_sd)
    drop = AdapterDropout(0.05).train()
    p = 1 - drop.keep_probability()
    torch.manual_seed(5)
    blocks, n = 256, 4096
    counts, first, last = [], 0, 0
    for _ in range(blocks):
        at = drop.positions(n)
        assert at.dtype == torch.int64 and (at[1:] > at[:-1]).all() and (at.numel() == 0 or 0 <= at[0] <= at[-1] < n)
        counts.append(at.numel())
        first += int(at.numel() > 0 and at[0] == 0)
        last += int(at.numel() > 0 and at[-1] == n - 1)
    counts = torch.tensor(counts, dtype=torch.float64)
    assert abs(counts.mean() - n * p) <= 5 * math.sqrt(n * p * (1 - p) / blocks)
    assert 0.7 < counts.var() / (n * p * (1 - p)) < 1.3
    assert abs(first / blocks - p) <= 5 * math.sqrt(p * (1 - p) / blocks)
    assert abs(last / blocks - p) <= 5 * math.sqrt(p * (1 - p) / blocks)
