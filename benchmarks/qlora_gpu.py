"""QLoRA training step on a GPU: tokens/s and peak GPU memory, lightning-peft against PEFT.

Issue #3's GPU point: a ~125M-parameter Llama config (hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000), NF4 + double quant, bf16 compute, LoRA r=16/alpha=32/dropout 0.05
on all linear layers but lm_head, batch 8 x 512, AdamW. Both variants share one 4-bit base
(``lp.quantize_base``); PEFT wraps it in its bitsandbytes LoRA layers (``is_loaded_in_4bit``).
Interleaved rounds (one step of each per round), median after warm-up; peak memory is
``torch.cuda.max_memory_allocated`` over each variant's steps, measured in its own pass.

    python benchmarks/qlora_gpu.py --out table.md        # on a CUDA machine (scripts/gpu_check.sh)
    python benchmarks/qlora_gpu.py --quick --out t.md    # tiny, runs on CPU too (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

FULL = dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000, batch=8, seq=512)
QUICK = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=128, batch=2, seq=16)


def build(variant: str, size: dict, device: torch.device):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import lightning_peft as lp

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                                         num_attention_heads=size["heads"], num_key_value_heads=size["heads"],
                                         intermediate_size=size["intermediate"], vocab_size=size["vocab"],
                                         max_position_embeddings=max(512, size["seq"]),
                                         tie_word_embeddings=False)).to(torch.bfloat16)
    lp.quantize_base(model, lp.QuantConfig(compute_dtype=torch.bfloat16), device=device)
    model.to(device)
    torch.manual_seed(1)
    if variant == "ours":
        lp.inject_adapters(model, lp.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05))
    else:
        model.is_loaded_in_4bit = True
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                           target_modules="all-linear"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def step(model, optimizer, batch: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    steps = args.steps or (2 if args.quick else 20)
    device = torch.device(args.device)
    batch = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=device)
    rows = {}
    for variant in ("PEFT", "ours"):  # one variant on the device at a time: peak memory is its own
        model, optimizer = build(variant, size, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = [step(model, optimizer, batch, device) for _ in range(args.warmup + steps)][args.warmup:]
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
        median = statistics.median(times)
        rows[variant] = (median, size["batch"] * size["seq"] / median, peak)
        del model, optimizer
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"Device: {name}; torch {torch.__version__}; median of {steps} steps after {args.warmup} warm-up",
             "", "| variant | ms/step | tokens/s | peak GPU memory (MiB) | ratio time | ratio memory |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant, (median, tps, peak) in rows.items():
        lines.append(f"| {variant} | {1e3 * median:.1f} | {tps:,.0f} | {peak / 2**20:,.1f} | "
                     f"{median / rows['PEFT'][0]:.2f} | {peak / rows['PEFT'][2]:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table)


if __name__ == "__main__":
    main()
