"""The LoRA layer against float64 hand computations: scaling, DoRA, dropout placement, PiSSA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_peft as lp
from conftest import rel_err
from lightning_peft.methods import LoraLayer


def _layer(use_dora=False, use_rslora=False, dropout=0.0, r=4, alpha=12, init=False, bias=True):
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(16, 8, bias=bias))
    layer.add_adapter("a", r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                      use_dora=use_dora, init_lora_weights=init)
    layer.active_adapter = "a"
    return layer


@pytest.mark.parametrize("use_rslora, expected", [(False, 12 / 4), (True, 12 / math.sqrt(4))])
def test_scaling_and_forward_match_float64(use_rslora, expected):
    layer = _layer(use_rslora=use_rslora)
    assert layer.scaling["a"] == pytest.approx(expected)
    x = torch.randn(5, 16)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    reference = x.double() @ W.T + b + expected * (x.double() @ A.T @ B.T)
    assert rel_err(layer(x), reference) <= 1e-6


def test_dora_matches_float64_formula_and_norm_is_detached():
    layer = _layer(use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].mul_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(5, 16)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    m, s = layer.lora_magnitude_vector["a"].double(), layer.scaling["a"]
    V = W + s * B @ A
    reference = (x.double() @ V.T) * (m / V.norm(dim=1)) + b
    out = layer(x)
    assert rel_err(out, reference) <= 1e-6
    # gradient w.r.t. B treats the norm as a constant: d/dB of sum(m/n * (x V^T)) with n fixed
    out.sum().backward()
    Bd = B.detach().clone().requires_grad_(True)
    n = V.norm(dim=1).detach()
    ((x.double() @ (W + s * Bd @ A).T) * (m / n) + b).sum().backward()
    assert rel_err(layer.lora_B["a"].weight.grad, Bd.grad) <= 1e-6


def test_dora_with_dropout_reuses_the_base_output():
    """Dropout hits the adapter branch only; the base layer runs once per forward."""
    layer = _layer(use_dora=True, dropout=0.5).train()
    calls = []
    layer.base_layer.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(64, 16)
    torch.manual_seed(5)
    out = layer(x)
    assert len(calls) == 1
    torch.manual_seed(5)
    dropped = layer.lora_dropout["a"](x)  # the same mask, drawn again from the same seed
    kept = dropped != 0
    assert 0.4 < kept.float().mean() < 0.6 and torch.equal(dropped[kept], x[kept] * 2)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = layer.lora_A["a"].weight.double(), layer.lora_B["a"].weight.double()
    m, s = layer.lora_magnitude_vector["a"].double(), layer.scaling["a"]
    V = W + s * B @ A
    reference = (x.double() @ W.T + s * dropped.double() @ A.T @ B.T) * (m / V.norm(dim=1)) + b
    assert rel_err(out, reference) <= 1e-6


def test_pissa_keeps_the_function_and_puts_top_r_svd_in_the_adapter():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    W = base.weight.detach().double().clone()
    model = nn.Sequential(base)
    x = torch.randn(6, 32)
    with torch.no_grad():
        before = model(x)
    lp.inject_adapters(model, lp.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        assert rel_err(model.eval()(x), before) <= 1e-6
        U, S, Vh = torch.linalg.svd(W)
        top = (U[:, :4] * S[:4]) @ Vh[:4]
        assert rel_err(layer.delta_weight("default"), top) <= 1e-5
        assert rel_err(layer.base_layer.weight, W - top) <= 1e-5


def test_embedding_adapter_matches_float64():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Embedding(20, 6, padding_idx=0))
    layer.add_adapter("a", r=3, lora_alpha=6)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_embedding_A["a"].normal_()
    ids = torch.tensor([[0, 3, 19, 7]])
    A, B = layer.lora_embedding_A["a"].double(), layer.lora_embedding_B["a"].double()
    reference = layer.base_layer.weight.double()[ids] + 2.0 * (A.T[ids] @ B.T)
    assert rel_err(layer(ids), reference) <= 1e-6


def test_dora_on_embedding_matches_float64():
    """DoRA on an embedding (as PEFT): table W + s (B A)^T, each embedding dimension rescaled to
    magnitude m over the vocabulary; PiSSA there is still refused with a fix."""
    torch.manual_seed(0)
    layer = LoraLayer(nn.Embedding(20, 6)).double()
    layer.add_adapter("a", r=3, lora_alpha=6, use_dora=True)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_embedding_A["a"].normal_()
        layer.lora_magnitude_vector["a"].mul_(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
    ids = torch.tensor([[0, 3, 19, 7]])
    A, B = layer.lora_embedding_A["a"], layer.lora_embedding_B["a"]
    table = layer.base_layer.weight + 2.0 * (B @ A).T  # [num, dim]
    table = table * (layer.lora_magnitude_vector["a"] / table.norm(dim=0))
    assert rel_err(layer(ids), table[ids]) <= 1e-12
    with pytest.raises(ValueError, match="exclude_modules"):
        LoraLayer(nn.Embedding(5, 4)).add_adapter("a", r=2, lora_alpha=2, init_lora_weights="pissa")


def test_adapter_report_counts_and_prints(capsys):
    from rich.console import Console

    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    lp.inject_adapters(model, lp.LoraConfig(r=2, target_modules=["0"], use_dora=True, modules_to_save=["2"],
                                            bias="lora_only"))
    report = lp.adapter_report(model, console=Console(width=120))
    lora, magnitude, copy, bias = 2 * (10 + 20), 20, 20 * 5 + 5, 20
    assert report.per_method == {"lora": lora, "dora_magnitude": magnitude, "modules_to_save": copy, "bias": bias}
    assert report.trainable_params == lora + magnitude + copy + bias == report.per_adapter["default"]
    base = 10 * 20 + 20 + 20 * 5 + 5
    assert report.total_params == base + lora + magnitude + copy
    assert report.trainable_bytes == 4 * report.trainable_params
    printed = capsys.readouterr().out
    assert "trainable" in printed and f"{report.trainable_params:,}" in printed


@pytest.mark.parametrize("where", ["base_layer", "global"])
@pytest.mark.parametrize("mixed", [False, True])
def test_a_hook_that_keeps_the_base_output_sees_the_base_output(where, mixed):
    """Inference accumulates the adapter into the base output in place; that must not reach a tensor
    a forward hook kept (activation capture): the kept tensor is W x + b, the layer's output adapted."""
    layer = _layer()
    layer.add_adapter("b", r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(2, 3, 16)
    kept = []

    def keep(module, args, output):
        if module is layer.base_layer:
            kept.append(output)

    with torch.no_grad():
        base = layer.base_layer(x).clone()
        expected = base + layer.scaling["a"] * (x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T)
        if mixed:  # row 0 through "a", row 1 through the base
            expected[1] = base[1]
        handle = (layer.base_layer.register_forward_hook(keep) if where == "base_layer"
                  else torch.nn.modules.module.register_module_forward_hook(keep))
        try:
            if mixed:
                layer.row_adapters = ["a", None]
            out = layer(x)
        finally:
            handle.remove()
            layer.row_adapters = None
        assert torch.equal(kept[0], base)
        assert torch.allclose(out, expected, atol=1e-6)
        assert layer._may_write_base_output()  # and with the hook gone, the in-place path is back
        row = layer(x)
    assert torch.allclose(row, base + layer.scaling["a"] * (x @ layer.lora_A["a"].weight.T
                                                           @ layer.lora_B["a"].weight.T), atol=1e-6)
