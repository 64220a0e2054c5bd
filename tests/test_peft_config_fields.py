"""PEFT config fields beyond the basics: ``layers_to_transform`` / ``layers_pattern``,
``lora_bias``, (IA)^3 ``modules_to_save``, ``exclude_modules`` as PEFT writes it; their errors.
(PEFT parity of each is in tests/test_peft_parity_matrix.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.methods import LoraLayer, ModulesToSave


class Stack(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4, bias=False)})
                                          for _ in range(n))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.model.layers:
            x = layer["v"](layer["q"](x))
        return self.head(x)


def _adapted(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))


def test_layers_to_transform_picks_layers_by_index():
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q", "v"], layers_to_transform=[0, 2]))
    assert _adapted(model) == ["model.layers.0.q", "model.layers.0.v", "model.layers.2.q", "model.layers.2.v"]
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], layers_to_transform=1,
                                                      layers_pattern="layers"))
    assert _adapted(model) == ["model.layers.1.q"]
    # the saved config lists what was adapted, so PEFT and we select the same modules again
    assert lp.adapter_configs(model)["default"].to_dict()["target_modules"] == ["model.layers.1.q"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_modules": ["q"], "layers_pattern": "layers"}, "needs layers_to_transform"),
    ({"target_modules": ".*q", "layers_to_transform": [0]}, "regex target_modules"),
    ({"target_modules": ["q"], "layers_to_transform": [-1]}, "ints >= 0"),
    ({"target_modules": ["q"], "lora_bias": True, "use_dora": True}, "pick one"),
])
def test_bad_layer_and_bias_fields_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lp.LoraConfig(**kwargs)


def test_layers_that_select_nothing_say_so():
    with pytest.raises(ValueError, match="no matching module sits in those layers"):
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], layers_to_transform=[7]))
    with pytest.raises(ValueError, match="no matching module sits in those layers"):
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern="blocks"))


def test_exclude_modules_with_the_names_it_excludes_listed():
    """PEFT writes target_modules=["q", "v"] with exclude_modules=["v"]: "v" is found, then excluded."""
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q", "v"], exclude_modules=["v"]))
    assert _adapted(model) == [f"model.layers.{i}.q" for i in range(3)]
    with pytest.raises(ValueError, match="'w' matches no module"):  # a name matching nothing is still an error
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q", "w"], exclude_modules=["v"]))


def test_lora_bias_trains_merges_and_refuses_what_it_cannot_do():
    x = torch.randn(3, 4)
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q", "v"], lora_bias=True,
                                                      init_lora_weights=False, lora_dropout=0.0))
    layer = model.model.layers[0]["q"]
    assert layer.lora_B["default"].bias.requires_grad
    # "v" has no bias to fold the lora_B bias into: merging is refused before anything changes
    with pytest.raises(RuntimeError, match="without a bias to fold it into"):
        lp.merge_adapters(model)
    with pytest.raises(ValueError, match="mixed-adapter batches do not support"):
        with lp.adapter_ids(model, ["default", None, "default"]):
            model(x)
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], lora_bias=True, init_lora_weights=False,
                                                      lora_dropout=0.0))
    with torch.no_grad():
        model.model.layers[1]["q"].lora_B["default"].bias.fill_(0.5)  # the bias alone changes the output
        before = model(x)
        lp.merge_adapters(model)
        torch.testing.assert_close(model(x), before)
        lp.unmerge_adapters(model)
        torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match="lora_bias=True works on linear layers"):
        lp.inject_adapters(nn.Sequential(nn.Embedding(5, 4)), lp.LoraConfig(target_modules=["0"], lora_bias=True))


def test_ia3_modules_to_save():
    model = lp.inject_adapters(Stack(), lp.IA3Config(target_modules=["v"], feedforward_modules=[],
                                                     modules_to_save=["head"]))
    assert isinstance(model.head, ModulesToSave)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.v.ia3_l.default" for i in range(3)} | {
        "head.modules_to_save.default.weight", "head.modules_to_save.default.bias"}
    assert lp.adapter_configs(model)["default"].to_dict()["modules_to_save"] == ["head"]
    assert lp.adapter_configs(model)["default"].to_dict()["feedforward_modules"] == []  # PEFT refuses null
