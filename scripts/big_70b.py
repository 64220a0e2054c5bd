"""A 70B-shaped Llama fine-tuned with QLoRA on one GPU: peak memory, step time, estimate_memory.

Issue #11's GPU point. The Llama-2-70B shape (80 layers, hidden 8192, intermediate 28672, 64 heads,
8 KV heads, vocab 32000; 69.0B parameters) is built with ``lp.empty_init`` (no storage) and filled
layer by layer with random bf16 weights generated on the GPU and quantized to NF4 there as they
are made (``lightning_peft.bigmodel.stream_quantized``): no float model ever exists. Then LoRA r=16
on all linear layers, non-reentrant gradient checkpointing, bitsandbytes' paged 8-bit AdamW, and
one training step at batch 1 x 512 tokens. Prints (and with ``--out`` writes) a markdown table:
peak GPU memory after loading and over the step (``torch.cuda.max_memory_allocated``), the
step's time, and ``lp.estimate_memory``'s prediction for the same run.

    python scripts/big_70b.py --out big_70b.md        # CUDA; fails above 48 GB; run by scripts/gpu_check.sh
    python scripts/big_70b.py --quick --out t.md      # a tiny Llama of the same make, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000, seq=512)
QUICK = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, seq=32)


class RandomWeights:
    """A ``TensorSource`` of random weights shaped like ``model``'s: N(0, 0.02) for matrices, ones
    for norm weights, generated on ``device`` in bf16 one tensor at a time."""

    def __init__(self, model: torch.nn.Module, device: torch.device, seed: int = 0) -> None:
        self._shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, key: str) -> torch.Tensor:
        shape = self._shapes[key]
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        return torch.randn(shape, generator=self.generator, dtype=torch.bfloat16, device=self.device).mul_(0.02)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def peak_memory(device: torch.device) -> float:
    """Peak bytes since the last reset: CUDA allocations, or the process's RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            open("/proc/self/clear_refs", "w").write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama on the CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args()

    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    import lightning_peft as lp
    from lightning_peft.bigmodel import stream_quantized

    shape = dict(QUICK if args.quick else LLAMA2_70B)
    seq = shape.pop("seq")
    device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --quick (CPU) or on a GPU machine")
    config = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    with lp.empty_init(), default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(config)  # meta: shapes only
    n_params = sum(p.numel() for p in model.parameters())
    estimate = lp.estimate_memory(model, "qlora", r=16, batch=1, seq_len=seq, optimizer="paged_adamw_8bit",
                                  gradient_checkpointing=True, show=False)

    reset_peak(device)
    start = time.perf_counter()
    stream_quantized(model, RandomWeights(model, device), lp.QuantConfig(compute_dtype=torch.bfloat16), device,
                     name="random weights")
    load_s = time.perf_counter() - start
    load_peak = peak_memory(device)

    lp.inject_adapters(model, lp.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    lp.enable_gradient_checkpointing(model)
    model.config.use_cache = False
    model.train()
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1)).to(device)

    reset_peak(device)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - start
    step_peak = peak_memory(device)
    if not torch.isfinite(loss):
        raise SystemExit(f"the step's loss is {loss.item()}")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (peak = process RSS)"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gb = 1e9
    table = "\n".join([
        f"Device: {where}; torch {torch.__version__}; {'quick (tiny) size' if args.quick else 'Llama-2-70B shape'}",
        "",
        "| model | params | trainable (LoRA r=16) | batch x seq | load s | peak after load (GB) | step s | "
        "peak over the step (GB) | estimate_memory (GB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        f"| {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']} | {n_params:,} | {trainable:,} | "
        f"1 x {seq} | {load_s:.1f} | {load_peak / gb:.3f} | {step_s:.2f} | {step_peak / gb:.3f} | "
        f"{estimate.total / gb:.3f} |",
        "",
    ])
    print(table)
    print(f"loss {loss.item():.4f}; estimate: base {estimate.base_weights / gb:.2f} GB, activations "
          f"{estimate.activations / gb:.2f} GB")
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table)
    if device.type == "cuda" and not args.quick and max(load_peak, step_peak) >= 48 * gb:
        raise SystemExit(f"peak GPU memory {max(load_peak, step_peak) / gb:.1f} GB: QLoRA of a 70B model should fit 48 GB")


if __name__ == "__main__":
    main()
