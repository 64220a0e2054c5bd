"""QLoRA training step on CPU: peak RSS and step time, lightning-peft against PEFT + bitsandbytes.

Both variants freeze the same model (built from one seed) into the same 4-bit base with
``lp.quantize_base`` (NF4, double quant, blocksize 64, lm_head kept in float; identical bnb
``Linear4bit`` layers and bytes, all with ``support_avx512bf16_for_cpu = False`` so that
bitsandbytes never repacks a weight in place). Ours: ``lp.inject_adapters``. PEFT: ``get_peft_model``
with ``model.is_loaded_in_4bit = True``, so that it wraps them in ``peft.tuners.lora.bnb.Linear4bit``
(checked). ``prepare_model_for_kbit_training`` is not used: it casts norms to fp32 and turns on
gradient checkpointing, which would change what is measured. LoRA r=16, alpha=32, dropout 0.05 on
all linear layers but lm_head, ``model.train()``, bf16 compute (``--compute-dtype float32``). A step
is forward + cross-entropy on random labels + backward + AdamW step + zero_grad.

Each variant lives in its own fresh process (``--worker``), which reports its RSS after imports
(the same modules in both), after building the float model and after quantize + inject + AdamW;
then it resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and runs one step per
request of the parent. The two workers of a pair start together (setup overlaps); the parent then
steps them in lock-step rounds, alternating which goes first, so that a busy machine slows both
alike (the idle one waits on a pipe). Peak RSS in training is ``VmHWM`` after the last step: exact,
no sampling thread competing with the steps; the training delta is that minus the RSS just before
the first step (activations, gradients, AdamW state, what the allocator keeps). Step time: median
of the timed rounds. ``--repeats`` fresh pairs of workers; the table shows medians over repeats
and the ratios ours / PEFT.

    python benchmarks/qlora_memory.py                  # full: Llama h=256, 4 layers, batch 8 x 128
    python benchmarks/qlora_memory.py --quick          # smoke test, < 30 s
    python benchmarks/qlora_memory.py --out table.md   # also write the markdown table to a file
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

# the LoRA step benchmark's model and sizes (importing lora_step also sets HF offline and silences warnings)
from lora_step import FULL, QUICK, build_model

VARIANTS = ("ours", "PEFT")
MIB = 1024.0  # KiB per MiB


def rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def hwm_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def reset_hwm() -> bool:
    """Set the kernel's peak-RSS mark (VmHWM, also ru_maxrss) back to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:  # not allowed here: VmHWM stays the lifetime peak, setup included
        return False


def worker(args) -> None:
    """Build the variant, report its setup, then run one training step per "step" line on stdin."""
    import warnings

    channel = os.fdopen(os.dup(1), "w", buffering=1)  # the reports; anything else printed goes to stderr
    os.dup2(2, 1)

    def send(obj) -> None:
        channel.write(json.dumps(obj) + "\n")

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import bitsandbytes as bnb  # noqa: F401  (both workers import the same modules)
    import peft
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401  (build_model's: counted with the imports)

    import lightning_peft as lp
    from lightning_peft.methods import LoraLayer

    torch.set_num_threads(args.threads)
    out = dict(variant=args.worker, rss_import=rss_kib())
    size = QUICK if args.quick else FULL
    model = build_model(size, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    input_ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
    labels = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen)
    out["rss_model"] = rss_kib()

    lp.quantize_base(model, lp.QuantConfig(quant_type="nf4", double_quant=True, blocksize=64,
                                           compute_dtype=getattr(torch, args.compute_dtype),
                                           skip_modules=("lm_head",)))
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    torch.manual_seed(args.seed + 1)
    if args.worker == "ours":
        lp.inject_adapters(model, lp.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
        layer_type = LoraLayer
    else:
        model.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bitsandbytes LoRA layer by it
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                           target_modules="all-linear"))
        layer_type = peft.tuners.lora.bnb.Linear4bit
    model.train()
    out["adapted"] = sum(isinstance(m, layer_type) for m in model.modules())
    if out["adapted"] != n_4bit:
        raise SystemExit(f"{args.worker}: {out['adapted']} {layer_type.__module__}.{layer_type.__name__} "
                         f"layers for {n_4bit} bnb Linear4bit layers")
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    out["rss_setup"] = rss_kib()
    out["peak_setup"] = hwm_kib()  # lifetime peak so far (imports, build, quantize, inject)

    def step() -> list[float]:
        start, cpu = time.perf_counter(), time.process_time()
        logits = model(input_ids=input_ids).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return [(time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3, loss.item()]

    send(out)
    out["hwm_reset"] = reset_hwm()
    for line in sys.stdin:  # the parent says "step" once per round, then "end"
        if line.strip() != "step":
            break
        send(step())
    out["peak_train"] = hwm_kib()
    out["delta_train"] = out["peak_train"] - out["rss_setup"]
    send(out)


class Worker:
    """One variant in its own process, stepped by the parent (idle, blocked on a read, in between)."""

    def __init__(self, variant: str, args) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--threads", str(args.threads),
               "--seed", str(args.seed), "--compute-dtype", args.compute_dtype] + (["--quick"] if args.quick else [])
        self.variant, self.stderr = variant, tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            raise SystemExit(f"worker {self.variant} failed:\n{self.stderr.read()[-3000:].decode(errors='replace')}")
        return json.loads(line)

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")
        return self.receive()

    def finish(self) -> dict:
        report = self.ask("end")
        self.proc.wait()
        return report


def run_repeat(rep: int, args) -> dict[str, dict]:
    """Start both workers (their imports and setup overlap), then step them in lock-step rounds,
    alternating which goes first, so that a busy machine slows both alike; returns their reports."""
    workers = {v: Worker(v, args) for v in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1])}
    for w in workers.values():
        w.receive()  # setup done (its numbers come again in the final report)
    steps: dict[str, list] = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.steps):
        for v in (VARIANTS if (rep + i) % 2 == 0 else VARIANTS[::-1]):
            steps[v].append(workers[v].ask("step"))
    reports = {v: w.finish() for v, w in workers.items()}
    for v, r in reports.items():
        r["first_loss"] = steps[v][0][2]
        timed = steps[v][args.warmup:]
        r["times"], r["cpu_times"] = [t[0] for t in timed], [t[1] for t in timed]
        r["step_ms"], r["cpu_ms"] = statistics.median(r["times"]), statistics.median(r["cpu_times"])
        q = statistics.quantiles(r["times"], n=4, method="inclusive") if len(timed) > 1 else r["times"] * 3
        r["step_p25"], r["step_p75"] = q[0], q[2]
    return reports


def table(results: dict[str, list[dict]]) -> str:
    mem = ("rss_import", "rss_model", "rss_setup", "peak_train", "delta_train")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in mem + ("step_ms", "cpu_ms")}
           for v, rs in results.items()}
    lines = ["| variant | RSS after imports MiB | + float model MiB | + 4-bit base, adapters, AdamW MiB | "
             "peak RSS in training MiB | training delta MiB | median ms/step | ms/step over repeats | "
             "median CPU ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in ("PEFT", "ours"):
        m, spread = med[v], [r["step_ms"] for r in results[v]]
        lines.append(f"| {v} | " + " | ".join(f"{m[k] / MIB:.1f}" for k in mem)
                     + f" | {m['step_ms']:.1f} | {min(spread):.1f}-{max(spread):.1f} | {m['cpu_ms']:.1f} |")
    ratio = {k: med["ours"][k] / med["PEFT"][k] for k in med["ours"]}
    lines.append("| ours / PEFT | " + " | ".join(f"{ratio[k]:.3f}" for k in mem)
                 + f" | {ratio['step_ms']:.2f} | | {ratio['cpu_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 20; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; 1 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="fresh worker pairs (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--out", default=None, help="write the markdown table to this path")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in each worker (default 2; 1 with --quick, which a busy "
                             "machine slows far less)")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="dtype of the 4-bit matmuls (default bfloat16, the QLoRA recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print each worker's report to stderr")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.threads = args.threads if args.threads is not None else (1 if args.quick else 2)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.worker:
        return worker(args)

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        for v, r in run_repeat(rep, args).items():
            results[v].append(r)
            if args.verbose:
                print(json.dumps({k: x for k, x in r.items() if "times" not in k}), file=sys.stderr)
    ours, theirs = results["ours"][0], results["PEFT"][0]
    if ours["trainable"] != theirs["trainable"] or ours["adapted"] != theirs["adapted"]:
        raise SystemExit(f"the variants differ: {ours} vs {theirs}")
    if abs(ours["first_loss"] - theirs["first_loss"]) > 1e-4 * abs(theirs["first_loss"]):
        raise SystemExit(f"first-step losses differ (B = 0 at init, same base): {ours['first_loss']} vs "
                         f"{theirs['first_loss']}")
    text = table(results)
    s = QUICK if args.quick else FULL
    print(f"# torch {version('torch')}, peft {version('peft')}, bitsandbytes {version('bitsandbytes')}, "
          f"transformers {version('transformers')}, {args.threads} threads; Llama h={s['hidden']}, {s['layers']} "
          f"layers, ffn {s['intermediate']}, vocab {s['vocab']}, batch {s['batch']}x{s['seq']}; NF4 + double quant, "
          f"{args.compute_dtype} compute; {ours['adapted']} LoRA layers, {ours['trainable']:,} trainable; "
          f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} workers per variant")
    print(text, end="")
    pairs = list(zip(results["ours"], results["PEFT"]))
    for key, label in (("peak_train", "peak RSS"), ("delta_train", "training delta"), ("step_ms", "ms/step"),
                       ("cpu_ms", "CPU ms/step")):
        ratios = [o[key] / p[key] for o, p in pairs]
        print(f"# ours / PEFT {label}, per repeat: {min(ratios):.3f}-{max(ratios):.3f}")
    paired = [statistics.median(a / b for a, b in zip(o["times"], p["times"])) for o, p in pairs]
    print(f"# ours / PEFT ms/step, median of the per-round ratios (lock-step rounds), per repeat: "
          f"{min(paired):.3f}-{max(paired):.3f}")
    if not all(r["hwm_reset"] for rs in results.values() for r in rs):
        print("# warning: /proc/self/clear_refs not writable: the peaks are lifetime peaks (setup included)",
              file=sys.stderr)
    noisy = [f"{r['variant']} {r['step_p25']:.0f}-{r['step_p75']:.0f} ms" for rs in results.values() for r in rs
             if r["step_p75"] > 1.5 * r["step_p25"]]
    if noisy:
        print(f"# warning: wide step-time spread within a worker (p25-p75: {', '.join(noisy)}): the machine was "
              f"busy; rerun on a quiet machine before trusting the time ratio", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
