"""Training-step speed of LoRA and DoRA: lightning-peft against HF PEFT, on CPU.

Four variants are built from the same seed (identical base weights) and fed the same batch:
ours LoRA, PEFT LoRA, ours DoRA, PEFT DoRA (r=16, alpha=32, dropout 0.05, all linear layers
but lm_head, fp32, ``model.train()``). One timed step is forward + cross-entropy on random labels +
backward, gradients cleared in between (no optimizer). The variants are interleaved round-robin
(one step of each per round, starting variant rotating) so that machine drift hits all of them
alike; the first ``--warmup`` rounds are dropped and the median of the next ``--steps`` is reported,
with ratios taken against a baseline from the same run.

    python benchmarks/lora_step.py                 # full size: Llama h=256, 4 layers, batch 8 x 128
    python benchmarks/lora_step.py --quick         # smoke test, a few seconds
    python benchmarks/lora_step.py --out table.md  # also write the markdown table to a file
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FULL = dict(hidden=256, layers=4, intermediate=688, vocab=1000, heads=4, kv_heads=4, batch=8, seq=128)
QUICK = dict(hidden=64, layers=2, intermediate=172, vocab=128, heads=4, kv_heads=4, batch=2, seq=16)

VARIANTS = ("ours LoRA", "PEFT LoRA", "ours DoRA", "PEFT DoRA")
# the ratio column: each variant's median over the median of its baseline (same run), and why
RATIOS = {
    "PEFT LoRA": (None, "baseline"),
    "ours LoRA": ("PEFT LoRA", "target <= 1.0"),
    "PEFT DoRA": ("PEFT LoRA", "reference"),
    "ours DoRA": ("ours LoRA", "target <= 1.3"),
}


def build_model(size: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv_heads"], vocab_size=size["vocab"],
                         max_position_embeddings=max(128, size["seq"]), tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def build_variant(name: str, size: dict, seed: int, r: int, alpha: float, dropout: float):
    model = build_model(size, seed)
    use_dora = name.endswith("DoRA")
    torch.manual_seed(seed + 1)  # adapter init draws from the RNG too: same state for every variant
    if name.startswith("ours"):
        import lightning_peft as lp

        model = lp.inject_adapters(model, lp.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                        target_modules="all-linear", use_dora=use_dora))
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                           target_modules="all-linear", use_dora=use_dora))
    return model.train()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def step(model, params, input_ids, labels) -> float:
    """One timed forward + backward; returns seconds."""
    for p in params:
        p.grad = None
    start = time.perf_counter()
    logits = model(input_ids=input_ids).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    return time.perf_counter() - start


def check_same_function(models: dict, input_ids) -> float:
    """Max abs logit difference between the variants in eval mode (fresh adapters are the identity
    map, so this checks that every variant starts from the same base weights and input)."""
    outs = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            outs[name] = model(input_ids=input_ids).logits
            model.train()
    ref = outs[VARIANTS[0]]
    return max((o - ref).abs().max().item() for o in outs.values())


def run(args) -> tuple[dict, dict, dict]:
    size = dict(QUICK if args.quick else FULL)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    input_ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
    labels = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)

    models = {v: build_variant(v, size, args.seed, args.r, args.alpha, args.dropout) for v in VARIANTS}
    params = {v: trainable(m) for v, m in models.items()}
    counts = {v: sum(p.numel() for p in ps) for v, ps in params.items()}
    diff = check_same_function(models, input_ids)
    if diff > 1e-4:
        raise SystemExit(f"variants disagree before training (max abs logit diff {diff:.2e})")
    for name in ("LoRA", "DoRA"):
        if counts[f"ours {name}"] != counts[f"PEFT {name}"]:
            raise SystemExit(f"{name}: trainable parameter counts differ: {counts}")

    if args.verbose:
        print(f"built {len(models)} models, max start logit diff {diff:.1e}", file=sys.stderr)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rounds = args.warmup + args.steps
    for i in range(rounds):
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
        this_round = {}
        for v in order:
            torch.manual_seed(args.seed + 100 + i)  # same RNG state (dropout) for every variant in a round
            this_round[v] = t = step(models[v], params[v], input_ids, labels)
            if i >= args.warmup:
                times[v].append(t)
        if args.verbose:
            ms = ", ".join(f"{v} {this_round[v] * 1e3:.1f}" for v in VARIANTS)
            print(f"round {i + 1}/{rounds}{' (warm-up)' if i < args.warmup else ''}: {ms} ms", file=sys.stderr)
    medians = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
    quartiles = {v: _quartiles_ms(ts) for v, ts in times.items()}
    return medians, quartiles, dict(size=size, counts=counts, diff=diff)


def _quartiles_ms(seconds: list[float]) -> tuple[float, float]:
    if len(seconds) < 2:
        return seconds[0] * 1e3, seconds[0] * 1e3
    q1, _, q3 = statistics.quantiles(seconds, n=4)
    return q1 * 1e3, q3 * 1e3


def table(medians: dict, quartiles: dict, counts: dict) -> str:
    lines = ["| variant | median ms/step | p25-p75 ms | trainable params | ratio | against |",
             "|---|---:|---:|---:|---:|---|"]
    for v in ("PEFT LoRA", "ours LoRA", "PEFT DoRA", "ours DoRA"):
        base, note = RATIOS[v]
        ratio = medians[v] / medians[base] if base else 1.0
        against = f"{base} ({note})" if base else note
        lo, hi = quartiles[v]
        lines.append(f"| {v} | {medians[v]:.1f} | {lo:.1f}-{hi:.1f} | {counts[v]:,} | {ratio:.2f} | {against} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--out", default=None, help="write the markdown table to this path")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--verbose", action="store_true", help="print progress to stderr")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    torch.set_num_threads(args.threads)
    medians, quartiles, info = run(args)
    text = table(medians, quartiles, info["counts"])
    import peft

    s = info["size"]
    print(f"# torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads; Llama h={s['hidden']}, "
          f"{s['layers']} layers, ffn {s['intermediate']}, vocab {s['vocab']}, batch {s['batch']}x{s['seq']}, "
          f"fp32, r={args.r}, alpha={args.alpha:g}, dropout {args.dropout}; median of {args.steps} interleaved "
          f"steps after {args.warmup} warm-up; start logits max diff {info['diff']:.1e}")
    print(text, end="")
    print(f"# ours DoRA / PEFT DoRA = {medians['ours DoRA'] / medians['PEFT DoRA']:.2f}")
    noisy = [v for v, (lo, hi) in quartiles.items() if hi > 1.5 * lo]
    if noisy:
        print(f"# warning: wide spread for {', '.join(noisy)} (p75 > 1.5 x p25): the machine was busy "
              f"during this run; rerun on a quiet machine before trusting the ratios", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
