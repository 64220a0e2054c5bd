"""The fused LoRA training node (methods/fused.py): same values and gradients as float64 and as the
plain autograd path, with and without dropout; taken exactly where it is equivalent; nothing
mask-sized saved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_peft as lp
from conftest import rel_err, tiny_llama
from lightning_peft.methods import LoraLayer
from lightning_peft.methods.dropout import AdapterDropout
from lightning_peft.methods.lora import LoraLayer as _Lora


def _layer(p: float, bias: bool = True, dtype=torch.float32, in_f: int = 48, out_f: int = 40,
           dora: bool = False) -> LoraLayer:
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(in_f, out_f, bias=bias).to(dtype).requires_grad_(False))
    layer.add_adapter("a", r=6, lora_alpha=12, lora_dropout=p, init_lora_weights=False, use_dora=dora)
    if dora:  # a magnitude away from the row norms, so that m / n is not all ones
        with torch.no_grad():
            layer.lora_magnitude_vector["a"].mul_(torch.rand(out_f) + 0.5)
    layer.active_adapter = "a"
    return layer.train()


def _run(layer: LoraLayer, x: torch.Tensor, upstream: torch.Tensor, seed: int = 11):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = layer(x)
    node = type(out.grad_fn).__name__
    out.backward(upstream)
    params = [layer.lora_A["a"].weight, layer.lora_B["a"].weight, *layer.lora_magnitude_vector.values()]
    grads = (x.grad, *(t.grad.clone() for t in params))
    for t in params:
        t.grad = None
    return out.detach(), grads, node


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5])  # none, the gaps draw, the bits draw
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dora", [False, True])
def test_fused_node_matches_float64_values_and_gradients(p, bias, dora):
    layer = _layer(p, bias, dora=dora)
    x = torch.randn(3, 70, 48)
    upstream = torch.randn(3, 70, 40)
    out, grads, node = _run(layer, x, upstream)
    assert node == "FusedLoraLinearBackward"
    drop = layer.lora_dropout["a"]
    torch.manual_seed(11)
    mask = drop.mask(x).double() if p else torch.ones_like(x, dtype=torch.float64)
    q = drop.keep_probability() if p else 1.0
    if p:
        assert 0 < (mask == 0).double().mean().item() < 2 * p
    W = layer.base_layer.weight.double()
    b = layer.base_layer.bias.double() if bias else 0.0
    A = layer.lora_A["a"].weight.detach().double().requires_grad_()
    B = layer.lora_B["a"].weight.detach().double().requires_grad_()
    xd = x.double().requires_grad_()
    s = layer.scaling["a"]
    unscaled = xd @ W.T + s * ((xd * mask / q) @ A.T @ B.T)
    references = [xd, A, B]
    if dora:  # m / ||W + s B A|| per output row, the norm a constant
        m = layer.lora_magnitude_vector["a"].detach().double().requires_grad_()
        references.append(m)
        unscaled = unscaled * (m / (W + s * B.detach() @ A.detach()).norm(dim=1))
    reference = unscaled + b
    reference.backward(upstream.double())
    assert rel_err(out, reference) <= 1e-6
    assert len(grads) == len(references)
    for ours, theirs in zip(grads, references):
        assert rel_err(ours, theirs.grad) <= 1e-6


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("dora", [False, True])
def test_fused_equals_plain_autograd_path(monkeypatch, p, dora):
    """Same RNG state, the fused node and the plain expression: same output and gradients (the plain
    path is what every other layer kind and compiled code run)."""
    layer = _layer(p, dora=dora)
    x, upstream = torch.randn(2, 33, 48), torch.randn(2, 33, 40)
    fused = _run(layer, x, upstream)
    monkeypatch.setattr(_Lora, "_fusable", lambda self, x: False)
    plain = _run(layer, x, upstream)
    assert fused[2] == "FusedLoraLinearBackward" and plain[2] != fused[2]
    assert rel_err(fused[0], plain[0]) <= 1e-6
    for a, b in zip(fused[1], plain[1]):
        assert rel_err(a, b) <= 1e-6


def test_fused_node_only_where_equivalent():
    """Taken in training (DoRA too); not under no_grad, nor with lora_bias, a trainable base bias, a hook
    on the base layer, autocast or a disabled adapter; a
    dtype mismatch fails as nn.Linear does."""
    x = torch.randn(4, 48)

    def node(layer, inp=x):
        return type(layer(inp).grad_fn).__name__ if torch.is_grad_enabled() else None

    assert node(_layer(0.1)) == "FusedLoraLinearBackward"
    with torch.no_grad():
        out = _layer(0.1)(x)
        assert out.grad_fn is None
    torch.manual_seed(0)
    dora = LoraLayer(nn.Linear(48, 40).requires_grad_(False))
    dora.add_adapter("a", r=4, lora_alpha=8, use_dora=True)
    dora.active_adapter = "a"
    assert node(dora) == "FusedLoraLinearBackward"
    biased = LoraLayer(nn.Linear(48, 40).requires_grad_(False))
    biased.add_adapter("a", r=4, lora_alpha=8, lora_bias=True)
    biased.active_adapter = "a"
    assert node(biased) != "FusedLoraLinearBackward"
    trainable_bias = _layer(0.0)
    trainable_bias.base_layer.bias.requires_grad_(True)
    assert node(trainable_bias) != "FusedLoraLinearBackward"
    hooked = _layer(0.0)
    seen = []
    hooked.base_layer.register_forward_hook(lambda m, i, o: seen.append(o))
    assert node(hooked) != "FusedLoraLinearBackward" and len(seen) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert node(_layer(0.0)) != "FusedLoraLinearBackward"
    with pytest.raises(RuntimeError, match="same dtype"):  # as nn.Linear itself says
        node(_layer(0.0), x.double())
    disabled = _layer(0.0)
    disabled.disabled = True
    assert node(disabled) != "FusedLoraLinearBackward"


def test_fused_dropout_saves_no_mask_and_replays_after_other_draws():
    """What the node keeps for backward: the dropped input (which the plain path keeps for A's
    gradient too), the [tokens, r] product, the weights; with the gaps draw ~p of the positions as
    int32. Backward uses the forward's draw although the generator moved on in between."""
    layer = _layer(0.05, in_f=256, out_f=64)
    x = torch.randn(512, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(3)
        out = layer(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].dtype == x.dtype  # the dropped input only
    positions = out.grad_fn.positions
    assert positions.dtype == torch.int32 and positions.numel() < 0.08 * x.numel()
    torch.rand(10_000)
    out.backward(torch.ones_like(out))
    dropped = (big[0] == 0) & (x != 0)
    assert torch.equal(dropped.flatten().nonzero().flatten(), positions.long())
    # the branch's input gradient is zero exactly where x was dropped: dx - W^T g = s/q (g B A) * mask
    base_part = torch.ones(512, 64) @ layer.base_layer.weight
    lora_part = x.grad - base_part
    assert lora_part[dropped].abs().max() < 1e-5 and lora_part[~dropped].abs().min() > 0


def test_model_training_with_fused_layers_matches_plain(monkeypatch):
    """A tiny Llama, every linear layer adapted with dropout: a training step's loss and adapter
    gradients equal the plain path's (same RNG state)."""
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear",
                                                          init_lora_weights=False)).train()
    ids = torch.randint(0, 128, (2, 24))

    def step():
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    nodes = []
    original = _Lora._fusable
    monkeypatch.setattr(_Lora, "_fusable", lambda self, x: nodes.append(original(self, x)) or nodes[-1])
    fused_loss, fused_grads = step()
    assert nodes and all(nodes)
    monkeypatch.setattr(_Lora, "_fusable", lambda self, x: False)
    plain_loss, plain_grads = step()
    assert rel_err(fused_loss, plain_loss) <= 1e-6
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        assert rel_err(fused_grads[name], plain_grads[name]) <= 1e-5, name


def test_adapter_dropout_gaps_and_bits_pick():
    assert AdapterDropout(0.05).uses_gaps(torch.empty(1)) and not AdapterDropout(0.3).uses_gaps(torch.empty(1))
