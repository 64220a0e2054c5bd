"""The PEFT zoo on one small task: trainable parameters, adapter file bytes, step time, final loss.

Eight variants adapt the same small base model to the same task, in one run: full fine-tuning,
LoRA, DoRA, (IA)^3, BitFit, prompt tuning, prefix tuning and a serial bottleneck adapter.

Task: a synthetic "language" whose next token follows a sparse bigram table (each token has 4
successors, drawn uniformly). The base Llama is first trained on table A (full fine-tuning,
``--pretrain`` steps, AdamW lr 1e-2); then each variant adapts it to table B, which rewires the successors of a
quarter of the vocabulary (a domain shift: most of what the base knows still holds). The best
possible loss on B is ln 4 = 1.386 (shown as the floor); the base's own loss on B is the start.

Training steps (forward, loss, backward, AdamW step) of the eight variants are interleaved
round-robin, one step of each per round with the starting variant rotating, so machine drift hits
all of them alike; the step time is the median after ``--warmup`` rounds and its ratio is taken
against full fine-tuning from the same run. The final loss is the mean eval loss on held-out
sequences of B after the last step. Learning rates are each method's usual range, fixed by hand
(not tuned on this task): full 1e-3; LoRA, DoRA, bottleneck 3e-3; BitFit 1e-2; prefix 1e-2;
(IA)^3 and prompt tuning 3e-2.

    python benchmarks/zoo.py                 # Llama h=64, 2 layers, vocab 128, batch 16 x 32
    python benchmarks/zoo.py --quick         # smoke test, a few seconds
    python benchmarks/zoo.py --out table.md  # also write the markdown table to a file
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from lora_step import build_model  # noqa: E402  (the Llama of the LoRA step benchmark, any size)

import lightning_peft as lp  # noqa: E402

FULL = dict(hidden=64, layers=2, intermediate=172, vocab=128, heads=4, kv_heads=2, batch=16, seq=32,
            pretrain=150, steps=100, warmup=5)
QUICK = dict(hidden=32, layers=2, intermediate=64, vocab=64, heads=4, kv_heads=2, batch=4, seq=16,
             pretrain=20, steps=6, warmup=1)
SUCCESSORS = 4

VARIANTS = {  # name: (config or None for full fine-tuning, learning rate)
    "full fine-tuning": (None, 1e-3),
    "LoRA r=8": (lambda: lp.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0), 3e-3),
    "DoRA r=8": (lambda: lp.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True), 3e-3),
    "(IA)^3": (lambda: lp.IA3Config(), 3e-2),
    "BitFit": (lambda: lp.BitFitConfig(), 1e-2),
    "prompt tuning (16 tokens)": (lambda: lp.PromptTuningConfig(num_virtual_tokens=16, init="vocab"), 3e-2),
    "prefix tuning (16 tokens)": (lambda: lp.PrefixTuningConfig(num_virtual_tokens=16), 1e-2),
    "bottleneck (rf=16, after FFN)": (lambda: lp.BottleneckConfig(reduction_factor=16), 3e-3),
}


def bigram_tables(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: ``[vocab, SUCCESSORS]`` successor tables; B rewires a quarter of A's rows."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, vocab, (vocab, SUCCESSORS), generator=gen)
    b = a.clone()
    rows = torch.randperm(vocab, generator=gen)[: vocab // 4]
    b[rows] = torch.randint(0, vocab, (len(rows), SUCCESSORS), generator=gen)
    return a, b


def sample(table: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    tokens = [torch.randint(0, len(table), (batch,), generator=gen)]
    for _ in range(seq - 1):
        choice = torch.randint(0, SUCCESSORS, (batch,), generator=gen)
        tokens.append(table[tokens[-1], choice])
    return torch.stack(tokens, dim=1)


def train_step(model, optimizer, batch: torch.Tensor) -> tuple[float, float]:
    """One AdamW step; returns ``(seconds, loss)``."""
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def eval_loss(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    model.train()
    return loss


def file_bytes(name: str, model) -> int:
    """Bytes on disk of what this variant must store: the adapter directory, or (full
    fine-tuning) the whole model as safetensors."""
    with tempfile.TemporaryDirectory() as tmp:
        if lp.adapter_configs(model):
            lp.save_adapter(model, tmp)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(tmp) / "model.safetensors"))
        return sum(f.stat().st_size for f in Path(tmp).iterdir())


def run(args) -> tuple[list[dict], dict]:
    size = dict(QUICK if args.quick else FULL)
    for key in ("pretrain", "steps", "warmup"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    table_a, table_b = bigram_tables(size["vocab"], args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    held_out = [sample(table_b, size["batch"], size["seq"], gen) for _ in range(4)]

    base = build_model(size, args.seed).train()
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-2, weight_decay=0.0)
    for i in range(size["pretrain"]):
        train_step(base, optimizer, sample(table_a, size["batch"], size["seq"], gen))
    start_loss = eval_loss(base, held_out)
    if args.verbose:
        print(f"pretrained {size['pretrain']} steps on A; loss on B {start_loss:.3f}", file=sys.stderr)

    models, optimizers, rows = {}, {}, {}
    for name, (make, lr) in VARIANTS.items():
        torch.manual_seed(args.seed + 7)
        model = copy.deepcopy(base)
        if make is not None:
            lp.inject_adapters(model, make())
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[name], optimizers[name] = model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        rows[name] = dict(variant=name, lr=lr, trainable=sum(p.numel() for p in params),
                          total=sum(p.numel() for p in model.parameters()), times=[])
    names = list(VARIANTS)
    for i in range(size["warmup"] + size["steps"]):
        batch = sample(table_b, size["batch"], size["seq"], gen)  # the same batch for every variant
        for name in names[i % len(names):] + names[:i % len(names)]:
            seconds, loss = train_step(models[name], optimizers[name], batch)
            if i >= size["warmup"]:
                rows[name]["times"].append(seconds)
        if args.verbose and (i + 1) % 25 == 0:
            print(f"round {i + 1}", file=sys.stderr)
    for name, row in rows.items():
        row["ms"] = statistics.median(row["times"]) * 1e3
        row["final"] = eval_loss(models[name], held_out)
        row["bytes"] = file_bytes(name, models[name])
    return list(rows.values()), dict(size=size, start=start_loss)


LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)


def trainable_at_7b(make) -> int:
    """Trainable parameters of the same config on a Llama-2-7B-shaped model, built on the meta
    device (``lp.empty_init``: no memory, a fraction of a second), where the sizes of the methods
    separate as they do in practice: LoRA adds ``r (in + out)`` per layer, (IA)^3 and BitFit a
    vector of ``out`` (or ``in``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with lp.empty_init():
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))
    if make is None:
        return sum(p.numel() for p in model.parameters())
    lp.inject_adapters(model, make())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def table(rows: list[dict], info: dict) -> str:
    full = rows[0]
    big = {row["variant"]: trainable_at_7b(VARIANTS[row["variant"]][0]) for row in rows}
    lines = ["| method | trainable params | % of model | file bytes | median ms/step | step vs full FT | lr "
             "| final loss on B | trainable at Llama-2-7B shape |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['trainable']:,} | {100 * row['trainable'] / full['total']:.3f} "
                     f"| {row['bytes']:,} | {row['ms']:.1f} | {row['ms'] / full['ms']:.2f} | {row['lr']:g} "
                     f"| {row['final']:.3f} | {big[row['variant']]:,} ({100 * big[row['variant']] / big[full['variant']]:.4f} %) |")
    lines.append(f"| (base model, no adaptation) | 0 | 0 | 0 | - | - | - | {info['start']:.3f} | |")
    lines.append(f"| (floor: ln {SUCCESSORS}) | | | | | | | {math.log(SUCCESSORS):.3f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--out", default=None, help="write the markdown table to this path")
    parser.add_argument("--steps", type=int, default=None, help="timed adaptation rounds (100; 6 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (5; 1 with --quick)")
    parser.add_argument("--pretrain", type=int, default=None, help="base training steps on A (150; 20 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print progress to stderr")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, info = run(args)
    s = info["size"]
    print(f"# torch {torch.__version__}, {args.threads} threads; Llama h={s['hidden']}, {s['layers']} layers, "
          f"ffn {s['intermediate']}, vocab {s['vocab']}, {s['heads']} heads / {s['kv_heads']} KV heads, batch "
          f"{s['batch']}x{s['seq']}, fp32; base pretrained {s['pretrain']} steps on A, then {s['warmup']} + "
          f"{s['steps']} interleaved AdamW steps on B per method")
    text = table(rows, info)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
