"""Serving many LoRA adapters from one base: a mixed-adapter batch against one adapter, on CPU.

32 requests of 16 tokens (further rows: 128 tokens, and 1 token, a decoding step), spread
round-robin over 8 adapters (r=16, alpha=32, all linear layers but lm_head), through the Llama
of benchmarks/lora_step.py (hidden 256, 4 layers), fp32, ``model.eval()``, forward only under
``torch.no_grad()``. Methods, all fed the same batch in the same run:

    floor             ours, the whole batch through one adapter (what a mixed batch cannot beat)
    ours mixed        ours, ``with lp.adapter_ids(model, ids)``: row n through adapter ids[n]
    PEFT mixed        HF PEFT, ``model(input_ids, adapter_names=ids)``
    PEFT one adapter  HF PEFT, the whole batch through one adapter (PEFT's own floor)
    set_adapter loop  ours, per adapter: ``set_adapter``, forward its rows, scatter them back
    use_adapter loop  the same with ``use_adapter`` (switches the active adapter only; set_adapter
                      also re-freezes every parameter)

With ``--compile`` two more, under ``torch.compile(fullgraph=True, dynamic=False)`` (inductor) of the
same model, whose ratios are to the compiled floor:

    compiled floor    the whole batch through one adapter, compiled
    compiled mixed    the mixed batch, compiled (the rows' adapters reach the graph as a tensor: one
                      graph for every ids list)

PEFT loads the adapters ours saved (identical weights; the script checks that every method's
logits agree). Methods are interleaved round-robin, the first method rotating per round; the
first ``--warmup`` rounds are dropped and the median of the next ``--steps`` is reported; ratios
divide medians of the same run by the floor's ("/ floor"), and "per round" is the median of each
round's own method / floor ratio (the two ran seconds apart: steadier on a busy machine).

    python benchmarks/multi_adapter.py                 # full size: 32 x 16, 32 x 128 and 32 x 1 tokens
    python benchmarks/multi_adapter.py --quick         # smoke test, a few seconds
    python benchmarks/multi_adapter.py --out table.md  # also write the markdown table to a file
    python benchmarks/multi_adapter.py --compile       # also the compiled floor and mixed batch

On Linux the script re-runs itself once with glibc's allocator thresholds fixed
(``STEADY_ALLOCATOR``), unless both are already set in the environment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the LoRA step benchmark's model (importing lora_step also sets HF offline and silences warnings)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from lora_step import FULL, QUICK, _quartiles_ms, build_model

METHODS = ("floor", "ours mixed", "PEFT mixed", "PEFT one adapter", "set_adapter loop", "use_adapter loop")
COMPILED = ("compiled floor", "compiled mixed")
TARGETS = {"ours mixed": "target <= 1.05", "PEFT mixed": "~1.15 expected", "set_adapter loop": "~1.65 expected",
           "compiled mixed": "target <= 1.05 (of the compiled floor)"}


def floor_of(method: str) -> str:
    """The method a row is divided by: the compiled floor for the compiled rows, else the floor."""
    return "compiled floor" if method in COMPILED else "floor"
TARGET_TOKENS = (16, 128)  # the request lengths the targets are set for (other rows: no target)


def build(size: dict, seed: int, adapters: int, r: int, alpha: float, directory: Path):
    """Ours with ``adapters`` random adapters ``a0, a1, ...``, and PEFT with the same ones."""
    import peft

    import lightning_peft as lp

    ours = build_model(size, seed).eval()
    names = [f"a{i}" for i in range(adapters)]
    config = lp.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                           init_lora_weights=False)
    for i, name in enumerate(names):
        torch.manual_seed(seed + 10 + i)
        lp.inject_adapters(ours, config, adapter_name=name)
        lp.save_adapter(ours, directory / name, adapter_name=name)
    lp.set_adapter(ours, names[0], trainable=False)
    theirs = peft.PeftModel.from_pretrained(build_model(size, seed), str(directory / names[0]), adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(str(directory / name), adapter_name=name)
    theirs.set_adapter(names[0])
    return ours, theirs.eval(), names


def runners(ours, theirs, names: list[str], input_ids: torch.Tensor, compiled=None) -> dict:
    """``{method: () -> logits [rows, seq, vocab]}``; row n's adapter is names[n % len(names)];
    ``compiled``: ``torch.compile(ours)``, which adds the compiled methods."""
    import lightning_peft as lp

    ids = [names[n % len(names)] for n in range(input_ids.shape[0])]
    groups = {name: [n for n, i in enumerate(ids) if i == name] for name in names}

    def floor():
        return ours(input_ids=input_ids).logits

    def mixed():
        with lp.adapter_ids(ours, ids):
            return ours(input_ids=input_ids).logits

    def peft_mixed():
        return theirs(input_ids=input_ids, adapter_names=ids).logits

    def peft_one():
        return theirs(input_ids=input_ids).logits

    def loop():
        out = None
        for name, rows in groups.items():
            lp.set_adapter(ours, name, trainable=False)
            logits = ours(input_ids=input_ids[rows]).logits
            out = logits.new_empty(input_ids.shape + logits.shape[-1:]) if out is None else out
            out[rows] = logits
        lp.set_adapter(ours, names[0], trainable=False)
        return out

    def use_loop():
        out = None
        for name, rows in groups.items():
            with lp.use_adapter(ours, name):
                logits = ours(input_ids=input_ids[rows]).logits
            out = logits.new_empty(input_ids.shape + logits.shape[-1:]) if out is None else out
            out[rows] = logits
        return out

    fns = {"floor": floor, "ours mixed": mixed, "PEFT mixed": peft_mixed, "PEFT one adapter": peft_one,
           "set_adapter loop": loop, "use_adapter loop": use_loop}
    if compiled is not None:
        def compiled_floor():
            return compiled(input_ids=input_ids).logits

        def compiled_mixed():
            with lp.adapter_ids(ours, ids):
                return compiled(input_ids=input_ids).logits

        fns.update({"compiled floor": compiled_floor, "compiled mixed": compiled_mixed})
    return fns


def check_agreement(fns: dict) -> float:
    """Max abs logit difference of the mixed methods from one another, and of the one-adapter
    methods from one another (both must be ~0: same weights, same function)."""
    out = {m: fn() for m, fn in fns.items()}
    mixed = max((out[m] - out["ours mixed"]).abs().max().item()
                for m in ("PEFT mixed", "set_adapter loop", "use_adapter loop", "compiled mixed") if m in out)
    single = max((out[m] - out["floor"]).abs().max().item() for m in ("PEFT one adapter", "compiled floor") if m in out)
    return max(mixed, single)


def time_methods(fns: dict, warmup: int, steps: int, verbose: bool) -> dict[str, list[float]]:
    methods = tuple(fns)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(warmup + steps):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        for m in order:
            start = time.perf_counter()
            fns[m]()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[m].append(elapsed)
        if verbose:
            print(f"round {i + 1}/{warmup + steps}: " + ", ".join(
                f"{m} {times[m][-1] * 1e3:.1f}" for m in methods if i >= warmup) + " ms", file=sys.stderr)
    return times


def table(rows: list[tuple[int, int, dict]]) -> str:
    """``/ floor``: median over median; ``per round``: the median of the rounds' own ratios (the
    floor and the method ran back to back, so a busy machine disturbs this one less). Compiled
    rows are divided by the compiled floor."""
    lines = ["| requests x tokens | method | median ms | p25-p75 ms | / floor | per round | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for requests, seq, times in rows:
        for m in times:
            floor = statistics.median(times[floor_of(m)])
            med = statistics.median(times[m])
            lo, hi = _quartiles_ms(times[m])
            paired = statistics.median(t / f for t, f in zip(times[m], times[floor_of(m)]))
            lines.append(f"| {requests} x {seq} | {m} | {med * 1e3:.1f} | {lo:.1f}-{hi:.1f} | "
                         f"{med / floor:.2f} | {paired:.2f} | {TARGETS.get(m, '') if seq in TARGET_TOKENS else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--out", default=None, help="write the markdown table to this path")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 30; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 5; 1 with --quick)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per request (default 16 128 1)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print per-round times to stderr")
    parser.add_argument("--compile", action="store_true",
                        help="also time the floor and the mixed batch under torch.compile (inductor; compiling takes minutes)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    tokens = args.tokens or ([8, 16] if args.quick else [16, 128, 1])
    requests = 8 if args.quick else args.requests
    size = dict(QUICK if args.quick else FULL)
    size["seq"] = max(tokens)
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ours, theirs, names = build(size, args.seed, args.adapters, args.r, args.alpha, Path(tmp))
        compiled = torch.compile(ours, fullgraph=True, dynamic=False) if args.compile else None
        for seq in tokens:
            gen = torch.Generator().manual_seed(args.seed + seq)
            input_ids = torch.randint(0, size["vocab"], (requests, seq), generator=gen)
            fns = runners(ours, theirs, names, input_ids, compiled)
            diff = check_agreement(fns)
            if diff > 1e-4:
                raise SystemExit(f"methods disagree at {requests} x {seq} tokens (max abs logit diff {diff:.2e})")
            rows.append((requests, seq, time_methods(fns, warmup, steps, args.verbose)))
            print(f"# {requests} x {seq}: methods agree to {diff:.1e}", file=sys.stderr)

    import peft

    text = table(rows)
    print(f"# torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads; Llama h={size['hidden']}, "
          f"{size['layers']} layers, ffn {size['intermediate']}, vocab {size['vocab']}; {args.adapters} adapters "
          f"r={args.r} round-robin over {requests} requests; fp32 forward, no_grad; median of {steps} interleaved "
          f"rounds after {warmup} warm-up")
    print(text, end="")
    noisy = sorted({f"{m} at {seq} tokens" for _, seq, times in rows for m in times
                    if (q := _quartiles_ms(times[m]))[1] > 1.5 * q[0]})
    if noisy:
        print(f"# warning: wide spread for {', '.join(noisy)} (p75 > 1.5 x p25): the machine was busy during this "
              f"run; rerun on a quiet machine (or with --threads 1) before trusting the ratios", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)


# glibc's allocator adapts its mmap threshold as blocks are freed, so whether each layer's ~0.5-2 MB
# activations and gathered weights are reused heap memory or fresh pages differs from process to
# process and skews the methods unevenly (docs/benchmarks.md). Fixed thresholds make runs repeatable.
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def _steady_allocator() -> None:
    """glibc reads these only at start-up: run this script again, once, with them set (values the
    caller already set are kept)."""
    if sys.platform.startswith("linux") and not STEADY_ALLOCATOR.keys() <= os.environ.keys():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**STEADY_ALLOCATOR, **os.environ})


if __name__ == "__main__":
    _steady_allocator()
    main()
