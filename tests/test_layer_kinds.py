"""LoRA / DoRA / (IA)^3 on convolutions, DoRA on nn.Embedding, LoRA on nn.MultiheadAttention.

HF PEFT is the oracle where it computes the intended function; where it does not (MultiheadAttention's
out_proj, a dilated conv) the reference is the plain layer with ``W + s B A`` written into it, in float64.
The base cases of PEFT's own matrix (Conv1d/2d/3d, groups, 1x1, MHA, embedding DoRA) run in
tests/test_peft_parity_matrix.py; these tests add stride/padding/dilation, mixed batches, refusals,
gradients, export, a quantized model, and training under Trainer(strategy="lora"/"qlora").
"""

from __future__ import annotations

import copy
import math

import lightning as L
import peft
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer
from safetensors.torch import load_file
from torch import nn

import lightning_peft as lp
from lightning_peft.checkpoint import adapter_tensors
from lightning_peft.methods import IA3ConvLayer, LoraConvLayer, LoraMHALayer
from lightning_peft.quantize import is_quantized

RTOL, ATOL = 1e-4, 1e-5


def _close(actual, expected, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module, shape: tuple):
        super().__init__()
        self.shape = shape
        self.conv = conv
        self.head = nn.Linear(1, 3)  # resized lazily below

    def forward(self, x):
        return self.conv(x.reshape(-1, *self.shape)).flatten(1)


def _perturb(model, seed=1234):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in lp.adapter_configs(model):
            for _, tensor in sorted(adapter_tensors(model, name).items()):
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))


def _shapes(directory):
    return {k: tuple(v.shape) for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}


CONVS = {
    "Conv2d stride 2 padding 1": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 7, 7)),
    "Conv1d padding same": (lambda: nn.Conv1d(4, 6, 3, padding="same"), (4, 9)),
    "Conv3d stride 2": (lambda: nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 2)), (2, 3, 5, 5)),
    "Conv2d groups 2 stride 2": (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), (4, 7, 7)),
}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_matches_peft_both_ways(case, use_dora, tmp_path):
    make, shape = CONVS[case]
    torch.manual_seed(0)
    base = ConvNet(make(), shape)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        base_out = base(x)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["conv"], use_dora=use_dora)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = lp.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        _close(ours(x), theirs(x), "PEFT's file here vs PEFT")

    ours = lp.inject_adapters(copy.deepcopy(base), lp.LoraConfig(init_lora_weights=False, **kwargs)).eval()
    assert isinstance(ours.conv, LoraConvLayer)
    _perturb(ours)
    with torch.no_grad():
        out = ours(x)
        assert not torch.allclose(out, base_out, rtol=RTOL, atol=ATOL)
        with lp.disable_adapters(ours):
            _close(ours(x), base_out, "disabled vs base")
    lp.save_adapter(ours, tmp_path / "ours")
    assert _shapes(tmp_path / "ours") == _shapes(tmp_path / "peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        _close(again(x), out, "our file in PEFT vs ours")

    if base.conv.groups > 1:
        with pytest.raises(RuntimeError, match=r"Conv2d\(groups=2\) cannot take LoRA adapter 'default'"):
            lp.merge_adapters(ours)
        with pytest.raises(RuntimeError, match="groups=2"):
            lp.export_merged(ours, tmp_path / "merged")
        return
    lp.merge_adapters(ours)
    with torch.no_grad():
        _close(ours(x), out, "merged vs unmerged")
    lp.unmerge_adapters(ours)
    _close(ours.conv.base_layer.weight, base.conv.weight, "unmerged kernel vs original")
    merged = lp.merged_state_dict(ours)
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    with torch.no_grad():
        _close(plain(x), out, "exported merged model vs adapted")


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 5, 3, dilation=2, padding=2), nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
                                  nn.Conv1d(3, 5, 3, dilation=3, stride=2)], ids=["dilation", "reflect", "conv1d-dilation"])
def test_dilated_and_padded_conv_adapter_is_the_weight_update(conv):
    """PEFT's lora_A drops dilation and padding mode (its layer fails on a dilated conv); ours keeps them,
    so the adapter equals the base conv with W + dW, checked in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(conv).double().eval()
    x = torch.randn(2, 3, *([11] * (conv.weight.dim() - 2)), dtype=torch.float64)
    lp.inject_adapters(model, lp.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    with torch.no_grad():
        out = model(x)
        reference = copy.deepcopy(conv)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        reference.weight += 2.0 * (B.flatten(1) @ A.flatten(1)).reshape(conv.weight.shape)
        _close(out, reference(x), "adapter vs conv with W + s B A", rtol=1e-10, atol=1e-10)


def test_conv_mixed_batch_rows_match_each_adapter_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    lp.inject_adapters(model, lp.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), "a")
    lp.inject_adapters(model, lp.LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False), "b")
    _perturb(model)
    model.eval()
    x = torch.randn(4, 3, 6, 6)
    ids = ["a", None, "b", "a"]
    with torch.no_grad(), lp.adapter_ids(model, ids):
        mixed = model(x)
    for row, name in enumerate(ids):
        with torch.no_grad():
            if name is None:
                with lp.disable_adapters(model):
                    alone = model(x[row:row + 1])
            else:
                with lp.use_adapter(model, name):
                    alone = model(x[row:row + 1])
        _close(mixed[row:row + 1], alone, f"row {row} ({name}) in a mixed batch vs alone")


def test_conv_combine_adapters_and_rank_spectrum():
    from lightning_peft.callbacks.rank_monitor import delta_singular_values

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2)).eval()
    x = torch.randn(2, 3, 7, 7)
    for name, r in (("a", 2), ("b", 4)):
        lp.inject_adapters(model, lp.LoraConfig(r=r, lora_alpha=r, target_modules=["0"], init_lora_weights=False), name)
    with torch.no_grad():
        with lp.disable_adapters(model):
            base = model(x)
        outs = []
        for name in ("a", "b"):
            with lp.use_adapter(model, name):
                outs.append(model(x))
        a, b = outs
        lp.combine_adapters(model, ["a", "b"], [1.0, 1.0], method="cat", new_name="ab")
        with lp.use_adapter(model, "ab"):
            _close(model(x), a + b - base, "combined adapter vs the sum of both updates")
    lp.inject_adapters(model, lp.LoraConfig(r=4, target_modules=["1"], init_lora_weights=False), "g")
    layer = model[1]
    A, B = layer.lora_A["g"].weight.flatten(1), layer.lora_B["g"].weight.flatten(1)
    dense = torch.zeros(4, 4 * 9)  # the grouped update, every input channel to every output channel
    for j in range(2):
        dense[2 * j:2 * j + 2] = B[2 * j:2 * j + 2] @ A[2 * j:2 * j + 2]
    _close(delta_singular_values(layer, "g"), torch.linalg.svdvals(layer.scaling["g"] * dense)[:4], "rank spectrum")
    with pytest.raises(ValueError, match=r"groups=2\) holds adapters \['g'\]"):
        lp.combine_adapters(model, ["g"], [1.0])


def test_conv_rank_must_divide_by_groups_and_a_refusal_changes_nothing():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.MultiheadAttention(4, 2), nn.Conv2d(4, 4, 3, groups=4))
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"rank r=6 .*multiple of groups.*r=4"):
        lp.inject_adapters(model, lp.LoraConfig(r=6, target_modules=["0", "1", "2"]))
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]  # no wrapper left behind
    assert not lp.adapter_configs(model)


def test_ia3_on_grouped_conv_matches_peft_and_merges_exactly(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 6, 1))
    x = torch.randn(2, 4, 5, 5)
    config = dict(target_modules=["0", "2"], feedforward_modules=["0"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False, **config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = lp.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert isinstance(ours[0], IA3ConvLayer) and ours[0].ia3_l["default"].shape == (1, 4, 1, 1)
    with torch.no_grad():
        expected = theirs(x)
        _close(ours(x), expected, "PEFT's (IA)^3 file here vs PEFT")
        lp.merge_adapters(ours)
        _close(ours(x), expected, "merged (grouped input scaling) vs unmerged")
        lp.unmerge_adapters(ours)
        _close(ours[0].base_layer.weight, base[0].weight, "unmerged kernel vs original")
    lp.save_adapter(ours, tmp_path / "ours")
    assert _shapes(tmp_path / "ours") == _shapes(tmp_path / "peft")


def test_embedding_dora_mixed_batch_and_merge():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 3))
    lp.inject_adapters(model, lp.LoraConfig(r=2, target_modules=["0"], use_dora=True), "a")
    lp.inject_adapters(model, lp.LoraConfig(r=3, target_modules=["0"], use_dora=True), "b")
    _perturb(model)
    model.eval()
    x = torch.randint(0, 20, (3, 5))
    with torch.no_grad(), lp.adapter_ids(model, ["b", "a", None]):
        mixed = model(x)
    with torch.no_grad():
        for row, name in enumerate(["b", "a"]):
            with lp.use_adapter(model, name):
                _close(mixed[row], model(x[row:row + 1])[0], f"row {row}")
        lp.set_adapter(model, "b")
        out = model(x)
        lp.merge_adapters(model)
        _close(model(x), out, "merged embedding DoRA vs unmerged")


# ------------------------------------------------------------------------------ MultiheadAttention
def _mha_reference(mha: nn.MultiheadAttention, layer: LoraMHALayer) -> nn.MultiheadAttention:
    """A plain copy of the attention module with ``W + s B A`` in both projections."""
    reference = copy.deepcopy(mha)
    out = layer.out_layer
    with torch.no_grad():
        reference.in_proj_weight += layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        reference.out_proj.weight += out.scaling["default"] * out.lora_B["default"].weight @ out.lora_A["default"].weight
    return reference


def test_mha_matches_the_weight_update_trains_merges_and_saves_as_peft(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.randn(2, 5, 8)
    model = lp.inject_adapters(copy.deepcopy(base), lp.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                                  init_lora_weights=False))
    layer = model[0]
    assert isinstance(layer, LoraMHALayer)
    _perturb(model)
    reference = _mha_reference(base[0], layer)
    out, weights = model[0](x, x, x)
    expected, expected_weights = reference(x, x, x)
    _close(out, expected, "LoRA on MHA vs MHA with W + s B A")
    _close(weights, expected_weights, "attention weights")

    # live gradients on all four factors (in_proj and out_proj), none on the base
    out.square().sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert base[0].in_proj_weight.grad is None

    with torch.no_grad():
        out = model[0](x, x, x)[0]
        with lp.disable_adapters(model):
            _close(model[0](x, x, x)[0], base[0](x, x, x)[0], "disabled vs base")
        lp.merge_adapters(model)
        _close(model[0](x, x, x)[0], out, "merged vs unmerged")
        lp.unmerge_adapters(model)
        _close(layer.base_layer.in_proj_weight, base[0].in_proj_weight, "in_proj after unmerge", atol=1e-6, rtol=0)
        _close(layer.out_layer.base_layer.weight, base[0].out_proj.weight, "out_proj after unmerge", atol=1e-6, rtol=0)
        plain = copy.deepcopy(base)
        plain.load_state_dict(lp.merged_state_dict(model))
        _close(plain[0](x, x, x)[0], out, "exported merged model vs adapted")

    # files: PEFT's keys and shapes, both ways, the same tensors
    lp.save_adapter(model, tmp_path / "ours")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    theirs.save_pretrained(tmp_path / "peft")
    assert _shapes(tmp_path / "ours") == _shapes(tmp_path / "peft")
    assert set(_shapes(tmp_path / "ours")) == {f"base_model.model.0.{k}" for k in (
        "lora_A.weight", "lora_B.weight", "base_layer.out_proj.lora_A.weight", "base_layer.out_proj.lora_B.weight")}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    peft_state = peft.get_peft_model_state_dict(loaded)
    for key, tensor in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items():
        assert torch.equal(peft_state[key.replace(".default", "")], tensor), key
    back = lp.load_adapter(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        _close(back[0](x, x, x)[0], out, "our file reloaded here")
        # PEFT 0.21 adds out_proj's delta twice (huggingface/peft#3774): its output is that of W_out + 2 s B' A'
        reference.out_proj.weight += layer.out_layer.scaling["default"] * (
            layer.out_layer.lora_B["default"].weight @ layer.out_layer.lora_A["default"].weight)
        _close(loaded.base_model.model[0](x, x, x)[0], reference(x, x, x)[0], "PEFT's MHA (out_proj delta doubled)")

    lp.delete_adapter(model, "default")
    assert type(model[0]) is nn.MultiheadAttention and type(model[0].out_proj) is type(base[0].out_proj)


def test_mha_in_transformer_encoder_fast_path_does_not_bypass_the_adapter():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                    enable_nested_tensor=False).eval()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        base_out = encoder(x)
    lp.inject_adapters(encoder, lp.LoraConfig(r=2, target_modules=["self_attn"], init_lora_weights=False))
    with torch.no_grad():
        adapted = encoder(x)  # eval + no_grad: torch's fused fast path would read the bare in_proj_weight
        assert not torch.allclose(adapted, base_out, atol=1e-4)
        lp.merge_adapters(encoder)
        _close(encoder(x), adapted, "merged (fast path allowed) vs adapted")


def test_mha_refusals_and_out_proj_redirect():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="use_dora=True is not available on nn.MultiheadAttention"):
        lp.inject_adapters(copy.deepcopy(model), lp.LoraConfig(target_modules=["0"], use_dora=True))
    with pytest.warns(UserWarning, match="out_proj of an nn.MultiheadAttention.*LoRA goes on the attention module '0'"):
        lp.inject_adapters(model, lp.LoraConfig(r=2, target_modules=["out_proj"]), "a")
    assert isinstance(model[0], LoraMHALayer)
    lp.inject_adapters(model, lp.LoraConfig(r=2, target_modules=["0"]), "b")
    x = torch.randn(3, 2, 8)  # (seq, batch, embed): rows are dim 1 here, still refused up front
    with pytest.raises(NotImplementedError, match=r"^0 \(MultiheadAttention\) holds LoRA adapters \['a'\]"):
        with lp.adapter_ids(model, ["a", "a"]):
            model[0](x, x, x)
    separate = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(ValueError, match="packed in_proj_weight"):
        lp.inject_adapters(separate, lp.LoraConfig(target_modules=["0"]))


def test_conv_and_mha_keep_a_float_base_under_quantization(caplog):
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3), "mha": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    lp.quantize_base(model, lp.QuantConfig(skip_modules=[]))
    assert is_quantized(model["fc"]) and not is_quantized(model["conv"])
    with caplog.at_level("INFO"):
        lp.inject_adapters(model, lp.LoraConfig(r=2, target_modules=["conv", "mha", "fc"]))
    assert "2 adapted layers (Conv2d, MultiheadAttention) keep a float base weight" in caplog.text
    assert model["conv"].base_layer.weight.dtype == torch.float32


# -------------------------------------------------------------------------- training under Trainer
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.hidden = nn.Linear(8, 16)  # what qlora quantizes: the classifier (fc) stays float
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(F.relu(self.hidden(x.mean(dim=(2, 3)))))


class Classifier(L.LightningModule):
    def __init__(self, net, data, loss_fn, lr=2e-2):
        super().__init__()
        self.net, self.data, self.loss_fn, self.lr = net, data, loss_fn, lr
        self.losses, self.grads = [], {}

    def training_step(self, batch, _):
        loss = self.loss_fn(self.net, batch)
        self.losses.append(loss.item())
        return loss

    def on_after_backward(self):
        self.grads = {n: (p.grad is not None and bool(p.grad.abs().sum() > 0))
                      for n, p in self.named_parameters() if p.requires_grad}

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=len(self.data))


def _fit(module, strategy, steps):
    L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module)
    return module


def _cnn_module():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 6, 6)
    labels = torch.arange(16) % 4
    images += labels[:, None, None, None] * 0.5  # learnable
    return Classifier(CNN(), torch.utils.data.TensorDataset(images, labels),
                      lambda net, batch: F.cross_entropy(net(batch[0]), batch[1]))


@pytest.mark.parametrize("strategy", ["lora", "qlora", "convs"])
def test_small_cnn_trains(strategy):
    if strategy == "convs":  # the convolutions themselves, DoRA on one of them
        strategy = lp.PEFTStrategy(peft_config=lp.LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "fc"],
                                                              rank_pattern={"conv1": 2}))
    module = _fit(_cnn_module(), strategy, 12)
    assert module.grads and all(module.grads.values()), module.grads
    if strategy == "qlora":  # the hidden layer is 4-bit, the classifier head stays float
        assert is_quantized(module.net.hidden.base_layer) and not is_quantized(module.net.fc.base_layer)
    assert module.losses[-1] < 0.9 * module.losses[0], module.losses
    if not isinstance(strategy, str):
        assert isinstance(module.net.conv1, LoraConvLayer) and isinstance(module.net.conv2, LoraConvLayer)
        assert sum(".conv" in n for n in module.grads) == 4


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_lightning_demo_transformer_trains_with_lora_on_attention(strategy):
    torch.manual_seed(0)
    net = Transformer(vocab_size=32, ninp=16, nhead=2, nhid=16, nlayers=1, dropout=0.0)
    tokens = torch.randint(0, 32, (8, 9))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    module = _fit(Classifier(net, data, lambda net, batch: F.nll_loss(net(batch[0], batch[1]), batch[1].reshape(-1)),
                             lr=1e-2), strategy, 10)
    attention = [m for m in net.modules() if isinstance(m, LoraMHALayer)]
    assert len(attention) == 3  # encoder self-attention, decoder self- and cross-attention
    assert sum(".lora_" in n for n in module.grads) >= 4 * 3
    assert module.grads and all(module.grads.values()), [n for n, ok in module.grads.items() if not ok]
    assert module.losses[-1] < 0.9 * module.losses[0], module.losses
    assert math.isfinite(module.losses[-1])
