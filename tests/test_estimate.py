"""estimate_memory: the rules of thumb (16 B/param, NF4 4.127 bits), exact adapter counts, and the
estimate against what a QLoRA step on the CPU really holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lightning_peft as lp
from conftest import tiny_llama, token_batch
from lightning_peft.estimate import estimate_memory

GB = 1e9
LLAMA_65B = dict(hidden_size=8192, num_layers=80, intermediate_size=22016, vocab_size=32000)
BENCHMARK = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, vocab_size=1000,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)


def _benchmark_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**BENCHMARK))


def test_full_finetune_7b_adamw_is_16_bytes_per_param():
    estimate = estimate_memory(7_000_000_000, method="full", optimizer="adamw", show=False)
    before_activations = estimate.base_weights + estimate.gradients + estimate.optimizer
    assert 106.4 * GB <= before_activations <= 117.6 * GB  # 7e9 * (4 + 4 + 8) = 112 GB
    assert estimate.adapters == 0 and estimate.trainable_params == 7_000_000_000
    # an 8-bit optimizer keeps 2 bytes instead of 8: 6 bytes/param less
    eight_bit = estimate_memory(7_000_000_000, method="full", optimizer="adamw_8bit", show=False)
    assert estimate.optimizer - eight_bit.optimizer == 6 * 7_000_000_000


def test_qlora_65b_fits_in_48gb_with_gradient_checkpointing():
    """QLoRA's headline: Llama-65B, r=16 on all linear layers, one 48 GB GPU (the paper trains with
    gradient checkpointing; without it the activations of 512 tokens alone are ~26 GB)."""
    estimate = estimate_memory(65_000_000_000, method="qlora", r=16, batch=1, seq_len=512,
                               gradient_checkpointing=True, show=False, **LLAMA_65B)
    assert estimate.total < 48 * GB
    nf4 = 65e9 * 4.127 / 8  # 4 bits + 8-bit absmax per 64 + fp32 absmax per 256 blocks of 64
    assert abs(estimate.base_weights - nf4) / nf4 < 0.03
    assert estimate.trainable_params == 80 * 16 * (4 * 2 * 8192 + 3 * (8192 + 22016))  # r (in + out)
    without = estimate_memory(65_000_000_000, method="qlora", batch=1, seq_len=512, show=False, **LLAMA_65B)
    assert without.total > 48 * GB
    no_double_quant = estimate_memory(65_000_000_000, method="qlora", double_quant=False, show=False, **LLAMA_65B)
    assert no_double_quant.base_weights - estimate.base_weights == pytest.approx(
        (4.5 - 4.127) / 8 * 80 * (4 * 8192**2 + 3 * 8192 * 22016), rel=1e-3)


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj", "down_proj"]])
def test_adapter_count_matches_injection(target_modules):
    model = tiny_llama()  # hidden 64, 2 layers, intermediate 128, 4 heads, 2 kv heads, vocab 128
    estimate = estimate_memory(model, "lora", r=16, target_modules=target_modules, weight_dtype=torch.float32,
                               show=False)
    lp.inject_adapters(model, lp.LoraConfig(r=16, target_modules=target_modules))
    report = lp.adapter_report(model, show=False)
    assert estimate.trainable_params == report.trainable_params
    assert estimate.adapters == report.trainable_bytes  # LoRA adapters in the base's dtype
    n_params = sum(p.numel() for p in tiny_llama().parameters())
    override = estimate_memory(tiny_llama(), "lora", trainable_fraction=0.5, show=False)
    assert override.trainable_params == round(0.5 * n_params)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_parameter_count_with_shapes_gives_the_same_estimate_as_the_module(method):
    """For a Llama without grouped queries the shape arithmetic is exact: same bytes, every part."""
    model = _benchmark_llama()
    n_params = sum(p.numel() for p in model.parameters())
    kwargs = dict(batch=8, seq_len=128, weight_dtype=torch.float32, compute_dtype=torch.float32, show=False)
    from_module = estimate_memory(model, method, **kwargs)
    from_count = estimate_memory(n_params, method, hidden_size=256, num_layers=4, intermediate_size=688,
                                 vocab_size=1000, **kwargs)
    assert from_count == from_module


@pytest.mark.parametrize("method,dtype,dropout", [("full", torch.float32, 0.0), ("lora", torch.bfloat16, 0.0),
                                                  ("qlora", torch.bfloat16, 0.05)])
def test_activation_formula_matches_what_autograd_saves(method, dtype, dropout):
    """The per-token formula against the bytes autograd keeps for backward (distinct storages, the
    parameters excluded) after the forward of an HF Llama with grouped queries. The estimate also
    counts the two fp32 log-probability-sized gradients backward starts with (8 V per token); those
    are not saved tensors, so they are taken off here."""
    model = tiny_llama(layers=6).to(dtype)  # the first layer saves less (its input needs no gradient)
    batch, seq = 4, 32
    estimate = estimate_memory(model, method, r=16, lora_dropout=dropout, batch=batch, seq_len=seq,
                               weight_dtype=dtype, compute_dtype=dtype, show=False)
    if method == "qlora":
        lp.quantize_base(model, lp.QuantConfig(compute_dtype=dtype))
    if method != "full":
        lp.inject_adapters(model, lp.LoraConfig(r=16, lora_dropout=dropout))
    model.train()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = token_batch(batch=batch, seq=seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=tokens, labels=tokens)
    predicted = estimate.activations - 8 * model.config.vocab_size * batch * seq
    assert abs(predicted - sum(saved.values())) / sum(saved.values()) < 0.03


_MEASURE = textwrap.dedent("""
    import gc, json, os, sys, warnings
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    import lightning_peft as lp
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**json.loads(sys.argv[1])))
    lp.quantize_base(model, lp.QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=torch.float32,
                                           blocksize=64, skip_modules=("lm_head",)))
    lp.inject_adapters(model, lp.LoraConfig(r=16, lora_alpha=32))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    warm = torch.randint(0, 1000, (1, 8))  # load lazy modules and kernels before the baseline
    model(input_ids=warm, labels=warm).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    tokens = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS: building the float model does not count
    for _ in range(2):  # the second step runs with AdamW's state allocated
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # VmHWM, not getrusage's ru_maxrss: a child started by vfork + exec inherits the parent's peak in
    # ru_maxrss (the kernel folds the old mm's high-water mark in at exec), so a big pytest parent
    # showed up as a 1.57 GB "step peak"; VmHWM is this process's own mark, reset by clear_refs above.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    print(json.dumps({"model_bytes": lp.memory_report(model, show=False).total_bytes,
                      "step_peak_bytes": peak - before}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_estimate_within_25_percent_of_a_measured_qlora_step():
    """The benchmark model (hidden 256, 4 layers), QLoRA (NF4 + double quant, fp32 compute, r=16,
    alpha 32, dropout 0.05, all linear layers), AdamW, 2 steps of batch 8 x 128 on the CPU, in a fresh
    process.

    Measured training memory = what the model holds once quantized and injected (the bytes of its
    tensors: packed NF4 weights with their absmax constants and code books, float embeddings, norms
    and lm_head, adapters; ``lp.memory_report``) + the peak RSS increase over the 2 steps above the RSS
    just before them (gradients, AdamW state, activations and every temporary). The fp32 model the
    NF4 weights were made from is gone by then and is not counted (the peak RSS is reset after it).
    glibc would keep freed blocks of the steps in its heap (the peak RSS is then ~1.8x the live
    bytes): ``MALLOC_MMAP_THRESHOLD_`` makes every tensor its own mapping, returned when freed, so the
    RSS follows the live bytes as ``torch.cuda.max_memory_allocated`` does on a GPU.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(2):  # two runs, the lower peak kept: the kernel's counters are noisy on a loaded machine
        result = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(BENCHMARK)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    measured = min(runs, key=lambda run: run["step_peak_bytes"])
    estimate = estimate_memory(_benchmark_llama(), "qlora", r=16, lora_dropout=0.05, batch=8, seq_len=128,
                               weight_dtype=torch.float32, compute_dtype=torch.float32, show=False)
    static = estimate.base_weights + estimate.adapters
    step = estimate.gradients + estimate.optimizer + estimate.activations
    print(f"model bytes: estimated {static:,} measured {measured['model_bytes']:,}; step peak: "
          f"estimated {step:,} measured {measured['step_peak_bytes']:,}")
    assert abs(static - measured["model_bytes"]) / measured["model_bytes"] < 0.02
    assert abs(step - measured["step_peak_bytes"]) / measured["step_peak_bytes"] < 0.25
    total = measured["model_bytes"] + measured["step_peak_bytes"]
    assert abs(estimate.total - total) / total < 0.25


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="method='qlra'.*'qlora'"):
        estimate_memory(1_000_000_000, "qlra", show=False)
    with pytest.raises(ValueError, match="optimizer='adam'.*'adamw'"):
        estimate_memory(1_000_000_000, optimizer="adam", show=False)
    with pytest.raises(ValueError, match="full fine-tuning trains every parameter"):
        estimate_memory(1_000_000_000, "full", trainable_fraction=0.01, show=False)
    with pytest.raises(ValueError, match="list from"):
        estimate_memory(1_000_000_000, target_modules=["attn.c_attn"], show=False)
    with pytest.raises(ValueError, match="more than the 1,000,000 parameters"):
        estimate_memory(1_000_000, hidden_size=4096, num_layers=32, show=False)
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4))
    with pytest.raises(ValueError, match="before quantize_base / inject_adapters"):
        estimate_memory(model, show=False)
