"""torch.compile over adapted models: LoRA, DoRA and (IA)3 trace as one graph (fullgraph=True) in
training and in inference; recompilations are counted (a new shape, a hot swap, set_adapter);
compiled training matches eager; PEFTStrategy(compile=...) compiles the adapted model in place.

Graph capture is checked with the "eager" backend (Dynamo only: fast); "aot_eager" where autograd
has to be traced too."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn
from torch._dynamo.utils import counters

import lightning_peft as lp
from conftest import rel_err, tiny_llama


class Mlp(nn.Module):
    """A model that is not a transformers model: q/k-style siblings sharing an input, an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(32, 32), nn.Linear(32, 32)
        self.up_proj, self.down_proj = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        h = self.q_proj(x) * torch.sigmoid(self.k_proj(x))
        return self.down_proj(torch.relu(self.up_proj(h)))


CONFIGS = {
    "lora": lambda: lp.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False),
    "dora": lambda: lp.LoraConfig(r=4, lora_dropout=0.1, use_dora=True, target_modules="all-linear",
                                  init_lora_weights=False),
    "ia3": lambda: lp.IA3Config(target_modules=["q_proj", "k_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_one_graph_in_training_and_inference(method):
    torch.manual_seed(0)
    model = lp.inject_adapters(Mlp(), CONFIGS[method]())
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # raises on any graph break
    x = torch.randn(4, 8, 32)
    model.train()
    compiled(x).square().mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    compiled(x)  # same shape, same mode: no new graph
    assert _graphs() == 1 and not counters["graph_break"]
    model.eval()
    with torch.no_grad():
        out = compiled(x)
        compiled(x)
    assert _graphs() == 2 and not counters["graph_break"]  # eval + no_grad: one more graph, once
    with torch.no_grad():
        assert rel_err(out, model(x)) <= 1e-6  # the compiled function is the eager one


def test_compiled_training_matches_eager_on_llama():
    """aot_eager traces the backward too: loss and adapter gradients equal eager's (dropout off,
    since compiled masks come from a different generator call), and a dropout step runs."""
    model = lp.inject_adapters(tiny_llama(layers=1), lp.LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear",
                                                                    init_lora_weights=False)).train()
    ids = torch.randint(0, 128, (2, 16))

    def step(fn):
        for p in model.parameters():
            p.grad = None
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = step(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss, grads = step(compiled)
    assert rel_err(loss, eager_loss) <= 1e-5
    assert all(rel_err(grads[n], g) <= 1e-4 for n, g in eager_grads.items())
    assert _graphs() == 1 and not counters["graph_break"]


def test_recompiles_only_for_a_new_shape_or_a_new_active_adapter():
    """A new input shape compiles once more; a hot swap (new weights, same tensors) never; set_adapter
    compiles once per adapter (the active adapter is a Python string Dynamo guards on), then switching
    back and forth reuses the graphs."""
    torch.manual_seed(0)
    model = lp.inject_adapters(Mlp(), lp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lp.inject_adapters(model, lp.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "b")
    lp.set_adapter(model, "default")
    model.eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    x = torch.randn(4, 8, 32)
    with torch.no_grad():
        before = compiled(x)
        compiled(x)
        assert _graphs() == 1
        compiled(torch.randn(2, 8, 32))  # a new shape: one compile
        compiled(torch.randn(2, 8, 32))
        assert _graphs() == 2
        layer = model.q_proj
        for store in (layer.lora_A, layer.lora_B):  # a hot swap writes new values into the same tensors
            store["default"].weight.mul_(2.0)
        swapped = compiled(x)
        assert _graphs() == 2 and not torch.allclose(swapped, before)
        assert rel_err(swapped, model(x)) <= 1e-6
        lp.set_adapter(model, "b")
        out_b = compiled(x)
        assert _graphs() == 3 and rel_err(out_b, model(x)) <= 1e-6
        for name in ("default", "b", "default", "b"):
            lp.set_adapter(model, name)
            compiled(x)
        assert _graphs() == 3 and not counters["graph_break"]


def test_strategy_compile_flag_compiles_the_adapted_model_in_place():
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Mlp()

        def training_step(self, batch, _):
            return self.model(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Module()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 32)), batch_size=4)
    strategy = lp.PEFTStrategy(peft_config=lp.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"),
                               compile={"backend": "eager", "fullgraph": True})
    trainer = L.Trainer(strategy=strategy, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert module.model._compiled_call_impl is not None  # nn.Module.compile: same module, same names
    assert isinstance(module.model.q_proj, lp.methods.LoraLayer)
    assert _graphs() == 1 and not counters["graph_break"]
    assert module.model.q_proj.lora_B["default"].weight.abs().sum() > 0  # it trained
    with pytest.raises(TypeError, match="compile="):
        lp.PEFTStrategy(compile="yes")


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_quantized_base_traces_as_one_graph(quant_type):
    """bitsandbytes (>= 0.45) registers its 4-bit/8-bit kernels as torch custom ops, so the adapted
    layers over a quantized base trace whole too, backward included (aot_eager). Where it stops:
    bitsandbytes' Linear4bit casts its own bias in place (``bias.data = bias.data.to(x.dtype)``) on
    the first call whose input dtype differs from the bias's (fp32 bias, bf16 compute dtype), which
    Dynamo refuses; one eager forward before compiling casts it for good."""
    torch.manual_seed(0)
    model = Mlp()
    lp.quantize_base(model, lp.QuantConfig(quant_type=quant_type))
    model = lp.inject_adapters(model, lp.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear",
                                                    init_lora_weights=False)).train()
    x = torch.randn(4, 8, 32)
    if quant_type == "nf4":
        with pytest.raises(Exception, match="mutate tensor data attribute to different dtype"):
            torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        dynamo.reset()
        counters.clear()
        model(x)  # the eager warm-up: bitsandbytes casts the biases to the compute dtype once
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()
    assert model.q_proj.lora_A["default"].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-5
    assert _graphs() == 2 and not counters["graph_break"]


def test_mixed_adapter_batches_trace_once_for_every_ids():
    """Under torch.compile a mixed batch takes its rows' slots as a tensor (set by adapter_ids): one
    graph serves every ids of a batch size (LoRA, DoRA, partial targets, base rows), gives the eager
    outputs and gradients, and sees a hot swap without recompiling."""
    torch.manual_seed(0)
    model = lp.inject_adapters(Mlp(), lp.LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear",
                                                    init_lora_weights=False))
    lp.inject_adapters(model, lp.LoraConfig(r=8, lora_dropout=0.0, use_dora=True, target_modules="all-linear",
                                          init_lora_weights=False), "b")
    lp.inject_adapters(model, lp.LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj", "down_proj"],
                                          init_lora_weights=False), "c")
    lp.set_adapter(model, "default", trainable=True)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    x = torch.randn(4, 8, 32)
    model.eval()
    with torch.no_grad():
        for ids in (["default", "b", None, "c"], ["b", "b", "c", "default"], [None] * 4):
            with lp.adapter_ids(model, ids):
                assert rel_err(compiled(x), model(x)) <= 1e-6
        assert _graphs() == 1
        layer = model.down_proj
        layer.lora_B["c"].weight.mul_(3.0)  # a hot swap of adapter c
        with lp.adapter_ids(model, ["c", "c", None, "b"]):
            assert rel_err(compiled(x), model(x)) <= 1e-6
        assert _graphs() == 1
    model.train()
    model.q_proj.lora_dropout["c"].p = model.down_proj.lora_dropout["c"].p = 0.0  # same function eager/compiled
    for ids in (["default", "b", None, "c"], ["c", "default", "default", None]):
        grads = []
        for fn in (compiled, model):
            model.zero_grad(set_to_none=True)
            with lp.adapter_ids(model, ids):
                fn(x).square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        assert all(rel_err(a, b) <= 1e-5 for a, b in zip(*grads))
    assert _graphs() == 2 and not counters["graph_break"]  # + the training graph, once


class Siblings(nn.Module):
    """Two layers fed the same input (as q and k are)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.q(x), self.k(x)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dropout_draws_gaps_per_layer_and_backward_uses_the_same_masks(backend):
    """Under torch.compile adapter dropout at p=0.05 is the opaque gaps op, one draw per layer:
    siblings fed the same input get different masks (inductor merges the two draws into one without
    the per-module salt), each keeps ~q, and backward multiplies by the forward's masks. With
    A = B = I, s = 1 and a zero base, each output is x * mask / q."""
    torch.manual_seed(0)
    model = lp.inject_adapters(Siblings(), lp.LoraConfig(r=64, lora_alpha=64, lora_dropout=0.05,
                                                         target_modules=["q", "k"]))
    with torch.no_grad():
        for layer in (model.q, model.k):
            layer.base_layer.weight.zero_()
            layer.lora_A["default"].weight.copy_(torch.eye(64))
            layer.lora_B["default"].weight.copy_(torch.eye(64))
    model.train()
    ops = []
    compiled = torch.compile(model, backend=_recording_backend(ops) if backend == "aot_eager" else backend,
                             fullgraph=True)
    x = (torch.rand(512, 64) + 0.5).requires_grad_()
    a, b = compiled(x)
    if backend == "aot_eager":  # the forward graph after AOT autograd's passes
        assert ops.count("lightning_peft.gap_keep_mask.default") == 2, ops
    q = model.q.lora_dropout["default"].keep_probability()
    keep_a, keep_b = a != 0, b != 0
    n = x.numel()
    for keep in (keep_a, keep_b):
        assert abs(keep.double().mean().item() - q) <= 5 * (q * (1 - q) / n) ** 0.5
    assert not torch.equal(keep_a, keep_b)
    torch.testing.assert_close(a[keep_a], (x / q)[keep_a])
    (a.sum() + b.sum()).backward()
    torch.testing.assert_close(x.grad, (keep_a.to(x.dtype) + keep_b.to(x.dtype)) / q)


def _recording_backend(ops: list):
    """aot_eager that lists the ops of the forward graph after AOT autograd's passes (CSE included)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm))


def test_compiled_dropout_does_not_recompile_per_layer():
    """Compiling a Llama whose decoder layers are separate frames (no fullgraph): with the gaps dropout
    every layer reuses its frame's graph, as without dropout (an int salt on the module was a
    constant per layer: one recompilation per layer, and Dynamo's limit of 8 ran out)."""
    x = torch.randint(0, 128, (2, 16))
    graphs = {}
    for p in (0.0, 0.05):
        dynamo.reset()
        counters.clear()
        model = lp.inject_adapters(tiny_llama(layers=4), lp.LoraConfig(r=4, lora_dropout=p, target_modules="all-linear"))
        model.train()
        compiled = torch.compile(model, backend="eager")
        compiled(input_ids=x).logits.sum().backward()
        compiled(input_ids=x).logits.sum().backward()
        graphs[p] = _graphs()
        assert not counters["stats"].get("recompile_limit_hit")
    assert graphs[0.05] == graphs[0.0], graphs
