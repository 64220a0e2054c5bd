"""QLoRA: a frozen 4-bit base (bitsandbytes, on CPU here), adapters over it, lossless export."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import peft
import pytest
import torch
from safetensors.torch import load_file

import lightning_peft as lp
from conftest import DEVICE, realistic_adapter, rel_err, tiny_llama, token_batch
from lightning_peft.quantize import dequantize_weight, is_quantized, logical_numel, quantize_linear


def _quantized_llama(seed=0, quant=None, **kwargs):
    return lp.quantize_base(tiny_llama(seed=seed, **kwargs), quant or lp.QuantConfig(compute_dtype=torch.float32))


def _dequantized_twin(quantized, seed=0, **kwargs):
    """A float model holding exactly the weights the quantized one computes with (the reference)."""
    twin = tiny_llama(seed=seed, **kwargs)
    with torch.no_grad():
        for path, module in quantized.named_modules():
            if is_quantized(module):
                twin.get_submodule(path).weight.copy_(dequantize_weight(module))
    return twin


def _packed_bytes(model):
    return {p: m.weight.data.clone() for p, m in model.named_modules() if is_quantized(m)}


def test_nf4_round_trip_error_and_same_bytes_as_bitsandbytes():
    weight = (torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(DEVICE)
    layer = quantize_linear(_linear_with(weight), lp.QuantConfig())
    error = ((dequantize_weight(layer).float() - weight).norm() / weight.norm()).item()
    assert error < 0.11
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.weight.data, packed)
    assert torch.equal(layer.weight.quant_state.absmax, state.absmax)
    assert torch.equal(layer.weight.quant_state.state2.absmax, state.state2.absmax)


def _linear_with(weight):
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@pytest.mark.parametrize("double_quant, low, high", [(True, 0.5, 0.52), (False, 0.5625, 0.5626)])
def test_memory_report_bytes_per_param(double_quant, low, high):
    model = lp.quantize_base(tiny_llama(hidden=256, layers=4), lp.QuantConfig(double_quant=double_quant))
    report = lp.memory_report(model, show=False)
    linear_params = sum(m.in_features * m.out_features for m in model.modules() if is_quantized(m))
    assert report.quantized_params == linear_params == 4 * (4 * 256 * 256 // 1 - 2 * 256 * 128 + 3 * 256 * 512)
    assert low <= report.quantized_bytes_per_param <= high  # NF4: 4 + 0.127 bits (4.5 without double quant)
    assert report.float_params == sum(p.numel() for n, p in model.named_parameters() if "proj" not in n)


def test_logical_numel_counts_weights_not_packed_bytes():
    model = tiny_llama()
    float_count = sum(p.numel() for p in model.parameters())
    lp.quantize_base(model, lp.QuantConfig())
    packed = sum(p.numel() for p in model.parameters())
    assert packed < float_count  # two 4-bit weights per stored byte: numel() undercounts
    assert sum(logical_numel(p) for p in model.parameters()) == float_count
    lp.inject_adapters(model, lp.LoraConfig(r=4))
    report = lp.adapter_report(model, show=False)
    assert report.total_params == float_count + report.per_adapter["default"]


def test_quantized_base_is_frozen_and_refuses_wrong_order():
    model = _quantized_llama()
    assert not any(p.requires_grad for p in model.parameters())
    assert not is_quantized(model.lm_head)  # the output head stays in float
    with pytest.raises(RuntimeError, match="already quantized"):
        lp.quantize_base(model)
    injected = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4))
    with pytest.raises(RuntimeError, match="before inject_adapters"):
        lp.quantize_base(injected)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapters_over_4bit_match_the_dequantized_float_model(use_dora):
    """Forward and backward through the 4-bit base equal a float model that holds the dequantized
    weights (DoRA's norm comes from the dequantized weight)."""
    x = token_batch()
    quantized = _quantized_llama()
    reference = _dequantized_twin(quantized)
    config = lp.LoraConfig(r=4, init_lora_weights=False, lora_dropout=0.0, use_dora=use_dora)
    torch.manual_seed(3)
    lp.inject_adapters(quantized, config)
    torch.manual_seed(3)
    lp.inject_adapters(reference, config)
    ours, ref = quantized(input_ids=x, labels=x), reference(input_ids=x, labels=x)
    assert rel_err(ours.logits, ref.logits) <= 1e-6
    ours.loss.backward()
    ref.loss.backward()
    quantized_params = dict(quantized.named_parameters())
    trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    assert trained
    for name, param in trained:
        assert rel_err(quantized_params[name].grad, param.grad) <= 1e-5, name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_export_merged_loads_into_plain_model_with_two_path_logits(tmp_path, use_dora, dtype, tol):
    x = token_batch()
    model = _quantized_llama()
    lp.inject_adapters(model, lp.LoraConfig(r=4, use_dora=use_dora, modules_to_save=["lm_head"]))
    realistic_adapter(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # a trained head copy
        two_path = model.eval()(x).logits
    packed = _packed_bytes(model)
    path = lp.export_merged(model, tmp_path, dtype=dtype)

    weights = load_file(path)
    assert {t.dtype for t in weights.values()} == {dtype}
    # different init: every weight must come from the file. The plain model computes in fp32 (bf16
    # values upcast exactly), so the check measures what the export did, not bf16 arithmetic.
    plain = tiny_llama(seed=9)
    plain.load_state_dict(weights, strict=True)
    with torch.no_grad():
        exported = plain(x).logits
    assert rel_err(exported, two_path) <= tol
    assert all(torch.equal(packed[p], m.weight.data) for p, m in model.named_modules() if is_quantized(m))
    assert (tmp_path / "lightning_peft_export.json").is_file()


def test_in_place_4bit_merge_is_refused_and_loses_most_of_the_adapter():
    """A realistic update (0.5% of ||W|| per layer) merged into NF4 in place: the output moves
    further from the adapted model than if the adapter were simply dropped."""
    x = token_batch()
    model = _quantized_llama()
    lp.inject_adapters(model, lp.LoraConfig(r=4, lora_dropout=0.0))
    realistic_adapter(model, size=0.005)
    with torch.no_grad():
        model.eval()
        adapted = model(x).logits
        with lp.disable_adapters(model):
            base = model(x).logits
    packed = _packed_bytes(model)
    with pytest.raises(RuntimeError, match="export_merged"):
        lp.merge_adapters(model)
    assert all(torch.equal(packed[p], m.weight.data) for p, m in model.named_modules() if is_quantized(m))

    with pytest.warns(UserWarning, match=r"lost \d+\.\d% of the adapter's weight update"):
        lp.merge_adapters(model, allow_lossy=True)
    with torch.no_grad():
        merged = model(x).logits
    effect = (adapted - base).norm()
    lost = ((merged - adapted).norm() / effect).item()
    assert lost > 0.5, f"in-place merge kept most of the adapter ({lost:.2f} of its effect lost)"
    with pytest.raises(RuntimeError, match="cannot be taken out"):
        lp.unmerge_adapters(model)


def test_qlora_training_on_cpu_learns_and_keeps_4bit_bytes():
    """A tiny Llama (bf16 compute, NF4 + double quant) learns 32 fixed random sequences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # initializer_range 0.1: a head with the logit range of a trained model (0.02 caps logits near 1)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         initializer_range=0.1)).to(DEVICE)
    lp.quantize_base(model, lp.QuantConfig())  # the recipe: NF4, double quant, bf16 compute
    lp.inject_adapters(model, lp.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0))
    packed = _packed_bytes(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(200):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert min(losses[-10:]) <= 0.5 * losses[0], (losses[0], losses[-1])
    assert all(torch.equal(packed[p], m.weight.data) for p, m in model.named_modules() if is_quantized(m))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_int8_base_with_lora_trains():
    model = lp.quantize_base(tiny_llama(), lp.QuantConfig(quant_type="int8"))
    reference = tiny_llama()
    x = token_batch()
    with torch.no_grad():
        assert rel_err(model(x).logits, reference(x).logits) < 0.05
    lp.inject_adapters(model, lp.LoraConfig(r=4))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_qlora_adapter_loads_into_peft_over_the_same_4bit_base(tmp_path):
    """Our adapter, trained over our NF4 base, in PEFT's bitsandbytes LoRA layers: same logits."""
    x = token_batch()
    model = _quantized_llama()
    lp.inject_adapters(model, lp.LoraConfig(r=4, init_lora_weights=False))
    with torch.no_grad():
        ours = model.eval()(x).logits
    lp.save_adapter(model, tmp_path)
    base = _quantized_llama()
    base.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bitsandbytes layers by it
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert any("bnb" in type(m).__module__ for m in theirs.modules())
    with torch.no_grad():
        assert rel_err(theirs(x).logits, ours) <= 1e-5
