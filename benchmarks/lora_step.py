"""Training-step speed against the floor: lightning-peft and HF PEFT as multiples of the frozen base, on CPU.

Every variant is built from the same seed (identical base weights, checked) and fed the same
batch: the frozen base (no adapters, every weight frozen, backward through the activations only:
the floor an adapter can approach), full fine-tuning (every weight trains), and for ours and PEFT:
LoRA without dropout, LoRA with dropout 0.05, DoRA with dropout 0.05 (r=16, alpha=32, all linear
layers but lm_head, fp32, ``model.train()``). With ``--compile`` each also runs under
``torch.compile`` (inductor; the compiled and eager variants share the model). One timed step is
forward + cross-entropy on random labels + backward, gradients cleared in between (no optimizer).
The variants are interleaved round-robin (one step of each per round, the starting variant
rotating) so that drift of a busy machine hits them alike; the first ``--warmup`` rounds are
dropped, and every row is a multiple of the frozen base from the same run (eager rows of the eager
base, compiled rows of the compiled base): the median over the timed rounds of the variant's step
time over the base's step time in that round (drift between rounds cancels), with the median ms
and the p25-p75 ms of the variant's own steps beside it.

    python benchmarks/lora_step.py                     # eager only: Llama h=256, 4 layers, batch 8 x 128
    python benchmarks/lora_step.py --compile           # eager and compiled columns (compiling takes minutes)
    python benchmarks/lora_step.py --quick             # smoke test, a few seconds
    python benchmarks/lora_step.py --out table.md      # also write the markdown table to a file

The last line is the bound: the frozen base's step plus LoRA's six matmuls per adapted layer
timed alone in this model's shapes (warm caches, no autograd): what no implementation of LoRA
beats on this machine.
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

# (row label, library, method, dropout); library None: the base model itself
ROWS = [("frozen base (floor)", None, "frozen", 0.0), ("full fine-tuning", None, "full", 0.0),
        ("LoRA, no dropout", "ours", "LoRA", 0.0), ("LoRA, no dropout", "PEFT", "LoRA", 0.0),
        ("LoRA, dropout 0.05", "ours", "LoRA", None), ("LoRA, dropout 0.05", "PEFT", "LoRA", None),
        ("DoRA, dropout 0.05", "ours", "DoRA", None), ("DoRA, dropout 0.05", "PEFT", "DoRA", None)]
BASE = "frozen base (floor)"


def key(row: tuple, compiled: bool) -> str:
    label, lib, _, _ = row
    return f"{lib or 'model'} | {label} | {'compiled' if compiled else 'eager'}"


def build_model(size: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv_heads"], vocab_size=size["vocab"],
                         max_position_embeddings=max(128, size["seq"]), tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def build_variant(lib: str | None, method: str, size: dict, seed: int, r: int, alpha: float, dropout: float):
    model = build_model(size, seed)
    if lib is None:
        if method == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            model.enable_input_require_grads()  # backward through the activations, as under an adapter
        return model.train()
    use_dora = method == "DoRA"
    torch.manual_seed(seed + 1)  # adapter init draws from the RNG too: same state for every variant
    if lib == "ours":
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
    outs = []
    with torch.no_grad():
        for model in models.values():
            model.eval()
            outs.append(model(input_ids=input_ids).logits)
            model.train()
    return max((o - outs[0]).abs().max().item() for o in outs)


def run(args) -> tuple[dict, dict, dict]:
    size = dict(QUICK if args.quick else FULL)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    input_ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
    labels = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)

    models = {row: build_variant(row[1], row[2], size, args.seed, args.r, args.alpha,
                                 args.dropout if row[3] is None else row[3]) for row in ROWS}
    params = {row: trainable(m) for row, m in models.items()}
    counts = {row: sum(p.numel() for p in ps) for row, ps in params.items()}
    diff = check_same_function(models, input_ids)
    if diff > 1e-4:
        raise SystemExit(f"variants disagree before training (max abs logit diff {diff:.2e})")
    by_label: dict[str, set] = {}
    for row, count in counts.items():
        if row[1] is not None:
            by_label.setdefault(row[0], set()).add(count)
    if any(len(c) != 1 for c in by_label.values()):
        raise SystemExit(f"trainable parameter counts differ between ours and PEFT: {by_label}")

    variants = {}  # key -> (callable, params)
    for row, model in models.items():
        variants[key(row, False)] = (model, params[row])
    if args.compile:
        # the 8 models share transformers' code objects, and Dynamo keeps at most recompile_limit
        # (default 8) graphs per code object: past it a model would silently run eager
        torch._dynamo.config.recompile_limit = 64
        for row, model in models.items():
            variants[key(row, True)] = (torch.compile(model), params[row])
    names = list(variants)
    if args.verbose:
        print(f"built {len(models)} models, max start logit diff {diff:.1e}; {len(names)} variants", file=sys.stderr)
    times: dict[str, list[float]] = {v: [] for v in names}
    rounds = args.warmup + args.steps
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        this_round = {}
        for v in order:
            torch.manual_seed(args.seed + 100 + i)  # same RNG state (dropout) for every variant in a round
            start = time.perf_counter()
            this_round[v] = t = step(*variants[v], input_ids, labels)
            if args.verbose and i == 0:
                print(f"  first step of {v}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
            if i >= args.warmup:
                times[v].append(t)
        if args.verbose:
            slowest = max(this_round, key=this_round.get)
            print(f"round {i + 1}/{rounds}{' (warm-up)' if i < args.warmup else ''}: "
                  f"{sum(this_round.values()):.2f} s, slowest {slowest} {this_round[slowest] * 1e3:.0f} ms", file=sys.stderr)
    medians = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
    quartiles = {v: _quartiles_ms(ts) for v, ts in times.items()}
    # each variant's time over the frozen base's in the same round (same mode), then the median:
    # a busy machine's drift between rounds cancels
    per_round = {}
    for v, ts in times.items():
        base = times[f"model | {BASE} | {v.rsplit(' | ', 1)[1]}"]
        per_round[v] = statistics.median(t / b for t, b in zip(ts, base))
    return medians, quartiles, dict(size=size, counts={key(row, False): c for row, c in counts.items()}, diff=diff,
                                    per_round=per_round, matmuls_ms=lora_matmuls_ms(size, args.r))


def lora_matmuls_ms(size: dict, r: int, reps: int = 30) -> float:
    """The bound no implementation beats: the time of LoRA's own six matmuls per adapted layer (forward
    ``x A^T`` and ``+= h B^T``; backward ``g^T h``, ``g B``, ``g_h^T x``, ``+= g_h A``), each layer
    shape of the model at this batch, timed alone (median of ``reps``; warm caches, no autograd)."""
    n, h, i = size["batch"] * size["seq"], size["hidden"], size["intermediate"]
    kv = h * size["kv_heads"] // size["heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    total = 0.0
    for fan_in, fan_out in shapes:
        x, g = torch.randn(n, fan_in), torch.randn(n, fan_out)
        A, B = torch.randn(r, fan_in), torch.randn(fan_out, r)
        out, dx, h_, g_h = torch.randn(n, fan_out), torch.randn(n, fan_in), torch.randn(n, r), torch.randn(n, r)

        def six():
            x.mm(A.t())
            out.addmm_(h_, B.t())
            g.t().mm(h_)
            g.mm(B)
            g_h.t().mm(x)
            dx.addmm_(g_h, A)

        samples = []
        for k in range(reps + 3):
            start = time.perf_counter()
            six()
            if k >= 3:
                samples.append(time.perf_counter() - start)
        total += statistics.median(samples)
    return total * size["layers"] * 1e3


def _quartiles_ms(seconds: list[float]) -> tuple[float, float]:
    if len(seconds) < 2:
        return seconds[0] * 1e3, seconds[0] * 1e3
    q1, _, q3 = statistics.quantiles(seconds, n=4)
    return q1 * 1e3, q3 * 1e3


RATIOS: dict = {}  # set by main: the per-round ratio medians of the run


def ratios(medians: dict) -> dict:
    """Each variant as a multiple of the frozen base in the same mode (same run): the median over
    rounds of its step time over the base's step time in that round."""
    return RATIOS


def table(medians: dict, quartiles: dict, counts: dict, compiled: bool) -> str:
    modes = ["eager", "compiled"] if compiled else ["eager"]
    rel = ratios(medians)
    head = "| variant | trainable params |" + "".join(f" ours {m} | PEFT {m} |" for m in modes)
    lines = [head, "|---|---:|" + "---:|---:|" * len(modes)]

    def cell(v):
        if v not in medians:
            return " |"
        lo, hi = quartiles[v]
        return f" {rel[v]:.2f}x ({medians[v]:.0f} ms, {lo:.0f}-{hi:.0f}) |"

    for label in dict.fromkeys(row[0] for row in ROWS):
        libs = [row[1] for row in ROWS if row[0] == label]
        first = "model" if libs == [None] else "ours"
        line = f"| {label} | {counts[f'{first} | {label} | eager']:,} |"
        for m in modes:
            line += cell(f"{first} | {label} | {m}") + (cell(f"PEFT | {label} | {m}") if first == "ours" else " |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def summary(medians: dict, compiled: bool) -> list[str]:
    rel = ratios(medians)
    out = []
    for m in (["eager", "compiled"] if compiled else ["eager"]):
        def r(lib, label):
            return rel[f"{lib} | {label} | {m}"]

        out.append(f"# {m}: ours LoRA {r('ours', 'LoRA, no dropout'):.3f}x (target <= 1.12), ours LoRA+dropout "
                   f"{r('ours', 'LoRA, dropout 0.05'):.3f}x (target <= 1.20), ours DoRA+dropout / ours LoRA+dropout "
                   f"{r('ours', 'DoRA, dropout 0.05') / r('ours', 'LoRA, dropout 0.05'):.3f} (target <= 1.15), ours / PEFT: "
                   + ", ".join(f"{label} {r('ours', label) / r('PEFT', label):.2f}" for label in
                               ("LoRA, no dropout", "LoRA, dropout 0.05", "DoRA, dropout 0.05")))
    return out


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
    parser.add_argument("--compile", action="store_true", help="also time every variant under torch.compile (inductor)")
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
    RATIOS.update(info["per_round"])
    text = table(medians, quartiles, info["counts"], args.compile)
    import peft

    sz = info["size"]
    print(f"# torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads; Llama h={sz['hidden']}, "
          f"{sz['layers']} layers, ffn {sz['intermediate']}, vocab {sz['vocab']}, batch {sz['batch']}x{sz['seq']}, "
          f"fp32, r={args.r}, alpha={args.alpha:g}; median of {args.steps} interleaved steps after {args.warmup} "
          f"warm-up; start logits max diff {info['diff']:.1e}; cells: multiple of the frozen base (median of per-round ratios), then median ms and p25-p75 ms")
    print(text, end="")
    for line in summary(medians, args.compile):
        print(line)
    floor = medians[f"model | {BASE} | eager"]
    print(f"# bound: the frozen base plus LoRA's six matmuls per layer timed alone ({info['matmuls_ms']:.1f} ms "
          f"against the eager floor's {floor:.0f} ms) = {1 + info['matmuls_ms'] / floor:.3f}x")
    noisy = [v for v, (lo, hi) in quartiles.items() if hi > 1.5 * lo]
    if noisy:
        print(f"# warning: wide spread for {', '.join(noisy)} (p75 > 1.5 x p25): the machine was busy "
              f"during this run; rerun on a quiet machine before trusting the ratios", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
