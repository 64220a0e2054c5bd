"""``lightning-peft --help`` and ``inspect`` start in about the time of ``import torch``: Lightning,
transformers and bitsandbytes are imported only by the commands that need them."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from torch import nn

import lightning_peft as lp

HEAVY = ("lightning", "transformers", "bitsandbytes", "matplotlib")


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - start


def _loaded(args: list[str]) -> list[str]:
    """Top-level packages among HEAVY that ``lightning-peft ARGS`` imports."""
    code = ("import sys\nfrom lightning_peft.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint(sorted({m.split('.')[0] for m in sys.modules} & set(" + repr(HEAVY) + ")))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    return eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 (our own print)


def _adapter(tmp_path):
    model = lp.inject_adapters(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)),
                               lp.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    return lp.save_adapter(model, tmp_path / "adapter")


def test_help_and_inspect_import_no_lightning_transformers_or_bitsandbytes(tmp_path):
    assert _loaded(["--help"]) == []
    assert _loaded(["inspect", str(_adapter(tmp_path))]) == []


def test_help_and_inspect_start_within_twice_import_torch(tmp_path):
    """Same run, interleaved, median of 3 after one warm-up: the page cache and the machine's load
    are shared by all sides. Measured on a shared 2-core machine: import torch ~3 s, --help
    ~1.0x, inspect ~1.2x; importing Lightning for --help made it ~3x."""
    directory = str(_adapter(tmp_path))
    commands = {"torch": [sys.executable, "-c", "import torch"],
                "help": [sys.executable, "-m", "lightning_peft.cli", "--help"],
                "inspect": [sys.executable, "-m", "lightning_peft.cli", "inspect", directory]}
    _seconds(commands["torch"])  # warm-up: torch's libraries into the page cache, for all three
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(3):
        for name, command in commands.items():
            times[name].append(_seconds(command))
    median = {name: statistics.median(values) for name, values in times.items()}
    assert median["help"] < 2 * median["torch"], median
    assert median["inspect"] < 2 * median["torch"], median

