"""Contamination scan speed: ``find_contamination`` on 100k training + 10k evaluation examples, one core.

Synthetic data: example lengths uniform in [32, 64] tokens, ids uniform over a 32,000 vocabulary
(random 13-grams never match by chance at that size). Planted: ``--leaks`` training examples get a
13-token span of a distinct evaluation example written into them, and ``--duplicates`` further
training examples are overwritten with copies of others. The scan must find exactly those (else
the script exits with an error). Three dataset formats, same tokens:

- ``tensors``: a list of 1-D int64 tensors (a tokenized torch dataset);
- ``dicts``: a list of ``{"input_ids": [ints]}`` (what an HF ``datasets.Dataset`` row looks like);
- ``text``: a list of strings of whitespace-separated words (one word per token id).

The timed call is the whole ``find_contamination`` (reading every example, hashing, lookup,
duplicate grouping); building the data is not timed. Single process, ``torch.set_num_threads(1)``.
Each format runs ``--repeats`` times; the median wall time is reported (examples/s = train + eval
examples over it), and the median CPU time of the process: on a shared machine the wall time
includes waiting for the core, the CPU time does not.

    python benchmarks/contamination.py                 # 100k + 10k, 3 repeats
    python benchmarks/contamination.py --quick         # 5k + 500, a few seconds
    python benchmarks/contamination.py --out table.md  # also write the markdown table to a file
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

FULL = dict(train=100_000, eval=10_000, leaks=100, duplicates=100)
QUICK = dict(train=5_000, eval=500, leaks=7, duplicates=5)
FORMATS = ("tensors", "dicts", "text")


def make_data(n_train: int, n_eval: int, leaks: int, duplicates: int, vocab: int, ngram: int, seed: int):
    """Token arrays for train and eval with planted leaks and duplicates; returns the planted indices."""
    rng = np.random.default_rng(seed)

    def sample(n):
        lengths = rng.integers(32, 65, n)
        return np.split(rng.integers(0, vocab, int(lengths.sum())), np.cumsum(lengths)[:-1])

    train, eval_ = sample(n_train), sample(n_eval)
    picked = rng.choice(n_train, leaks + 2 * duplicates, replace=False)
    leaked, sources, copies = picked[:leaks], picked[leaks:leaks + duplicates], picked[leaks + duplicates:]
    for i, j in zip(leaked, rng.choice(n_eval, leaks, replace=False)):
        train[i] = train[i].copy()
        train[i][5:5 + ngram] = eval_[j][3:3 + ngram]
    for source, copy in zip(sources, copies):
        train[copy] = train[source].copy()
    return train, eval_, sorted(leaked.tolist()), duplicates


def as_format(arrays: list[np.ndarray], fmt: str) -> list:
    if fmt == "tensors":
        return [torch.from_numpy(a) for a in arrays]
    if fmt == "dicts":
        return [{"input_ids": a.tolist()} for a in arrays]
    return [" ".join(f"w{t}" for t in a.tolist()) for a in arrays]


def run(args) -> list[dict]:
    from lightning_peft.callbacks.contamination_guard import find_contamination

    size = QUICK if args.quick else FULL
    train, eval_, leaked, duplicates = make_data(size["train"], size["eval"], size["leaks"], size["duplicates"],
                                                 args.vocab, args.ngram, args.seed)
    tokens = sum(map(len, train)) + sum(map(len, eval_))
    rows = []
    for fmt in FORMATS:
        train_data, eval_data = as_format(train, fmt), as_format(eval_, fmt)
        times, cpu = [], []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            report = find_contamination(train_data, eval_data, ngram=args.ngram)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        if report.train_indices != leaked or report.n_duplicates != duplicates:
            raise SystemExit(f"{fmt}: found {report.n_contaminated} contaminated (planted {len(leaked)}) and "
                             f"{report.n_duplicates} duplicate copies (planted {duplicates})")
        wall = statistics.median(times)
        rows.append(dict(format=fmt, train=len(train), eval=len(eval_), tokens=tokens, wall=wall,
                         cpu=statistics.median(cpu),
                         rate=(len(train) + len(eval_)) / wall, found=report.n_contaminated, planted=len(leaked),
                         dups=report.n_duplicates, spread=(min(times), max(times))))
        if args.verbose:
            print(f"{fmt}: " + ", ".join(f"{t:.2f}" for t in times) + " s", file=sys.stderr)
        del train_data, eval_data
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| format | train examples | eval examples | tokens | wall s (median) | min-max s | CPU s | examples/s "
             "| contaminated found / planted | duplicate copies found |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['train']:,} | {r['eval']:,} | {r['tokens']:,} | {r['wall']:.2f} | "
                     f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f} | {r['cpu']:.2f} | {r['rate']:,.0f} | "
                     f"{r['found']} / {r['planted']} | {r['dups']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5k + 500 examples, one repeat: a smoke test")
    parser.add_argument("--out", default=None, help="write the markdown table to this path")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per format (default 3; 1 with --quick)")
    parser.add_argument("--ngram", type=int, default=13)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print every timed run to stderr")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    torch.set_num_threads(1)
    rows = run(args)
    text = table(rows)
    print(f"# numpy {np.__version__}, torch {torch.__version__}, Python {platform.python_version()}, 1 thread; "
          f"lengths 32-64, vocab {args.vocab:,}, ngram {args.ngram}; median of {args.repeats}")
    print(text, end="")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
