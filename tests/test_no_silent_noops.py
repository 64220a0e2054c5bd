"""No silent no-ops (issue 19, point 5): an adapter whose output could never reach the forward is
refused at injection; "all-linear" on a model whose weights sit mostly in convolutions says so
with the counts; under quantization the output head stays float for any model, not only for
transformers models (``get_output_embeddings``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.quantize import is_quantized


class Attention(nn.Module):
    """A transformer block as Lightning's demo ``Transformer`` builds one: ``nn.MultiheadAttention``
    (whose forward reads ``out_proj.weight`` and never calls ``out_proj``) and a feed-forward."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x):
        return self.ff(self.attn(x, x, x, need_weights=False)[0])


class SmallCNN(nn.Module):
    """Most weights in convolutions, one linear classifier at the end."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


def test_an_adapter_on_multihead_attention_out_proj_is_refused():
    """MHA passes ``out_proj.weight`` and ``.bias`` to ``F.multi_head_attention_forward``: an (IA)^3
    or BitFit layer or a modules_to_save copy there would get no input and no gradient while
    counting as trainable and being saved. (LoRA goes on the attention module itself instead.)"""
    model = Attention()
    with torch.no_grad():  # the premise: wrapping out_proj would change nothing the forward computes
        x = torch.randn(2, 5, 16)
        before = model(x)
        model.attn.out_proj.forward = lambda *a: (_ for _ in ()).throw(AssertionError("called"))
        assert torch.equal(model(x), before)
    del model.attn.out_proj.forward
    for config in (lp.IA3Config(target_modules=["out_proj", "ff"], feedforward_modules=[]),
                   lp.BitFitConfig(target_modules=["ff", "out_proj"]),
                   lp.LoraConfig(target_modules=["ff"], modules_to_save=["out_proj"])):
        with pytest.raises(ValueError, match=r"attn\.out_proj.*MultiheadAttention.*out_proj\.weight.*exclude_modules"):
            lp.inject_adapters(model, config)
        assert not lp.adapter_configs(model)  # refused before anything changed
        assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert type(model.ff) is nn.Linear
    # LoRA with "all-linear" is live everywhere: every trainable tensor gets a gradient
    lp.inject_adapters(model, lp.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    model(torch.randn(2, 5, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_all_linear_on_a_mostly_convolutional_model_warns_with_the_counts():
    model = SmallCNN()
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    with pytest.warns(UserWarning, match=rf"adapts 1 linear layers? with 320 weights.*2 convolution layers hold "
                                         rf"{conv:,} weights") as record:
        lp.inject_adapters(model, lp.LoraConfig(target_modules="all-linear"))
    assert "features.0" in str(record[0].message)  # names the convolutions to list instead
    with warnings.catch_warnings():  # a model whose weights are mostly linear: no warning
        warnings.simplefilter("error")
        lp.inject_adapters(nn.Sequential(nn.Linear(64, 64), nn.Conv1d(4, 4, 1), nn.Linear(64, 2)),
                           lp.LoraConfig(target_modules="all-linear"))


def test_the_output_head_of_any_model_stays_float_under_quantization():
    """Not only a transformers model's ``get_output_embeddings()``: a CNN's or an MLP's final
    classifier is the output head too, as transformers' own bitsandbytes integration treats it."""
    model = SmallCNN()
    model.features.append(nn.Linear(32, 32))  # one hidden linear layer to quantize
    lp.quantize_base(model)
    assert is_quantized(model.features[-1]) and type(model.classifier) is nn.Linear
    mlp = lp.quantize_base(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)))
    assert [is_quantized(m) for m in mlp if not isinstance(m, nn.ReLU)] == [True, True, False]
