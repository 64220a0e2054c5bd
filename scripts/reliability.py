"""Crash and bad-input trials for lightning-peft's save and load paths; prints one table.

Kill trials: for each save path (``save_adapter``, ``export_merged``, ``AdapterCheckpoint``) a
fresh server process builds a tiny model and two different versions of what it saves (another
``r`` *and* another ``lora_alpha``, so that a mixed directory would fail to load or load with the
wrong scaling). Each trial forks a child that saves in a loop into one directory, kills it with
``SIGKILL`` after a random delay (uniform over four save durations; for AdapterCheckpoint over the time a child takes to start and save three steps, so kills land anywhere in a
save), then loads the directory as a user would and compares logits with both versions, bit for
bit: ``old``/``new`` (exactly one of them), ``mixed`` (loads, matches neither: a silent result) or
``lost`` (missing or does not load). ``AdapterCheckpoint`` runs a real ``Trainer`` (top-2 by step,
pruned every step, ``last`` replaced every step, each child resuming from ``last``); every visible
save is checked against the logits recorded for its step, and against its own
``training_state.ckpt``.

The bad-input sweep is ``scripts/reliability_inputs.py``'s ``run_sweep()`` when present.

    python scripts/reliability.py                     # 50 kill trials per path + the sweep
    python scripts/reliability.py --trials 200 --swap rename   # the two-rename fallback swap
    python scripts/reliability.py --json              # one JSON object instead of the table

Target: 0 silent, 0 lost, 0 tracebacks (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("save_adapter", "export_merged", "adapter_checkpoint")
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------- the server
def _tiny(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))


def _version(seed: int, r: int, alpha: float):
    """The base (seed 0, same for every version) with a LoRA adapter of its own r, alpha, weights."""
    import torch

    import lightning_peft as lp

    model = _tiny(0)
    lp.inject_adapters(model, lp.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    return model.eval()


PROBE_SEED = 1234


def _probe():
    import torch

    return torch.randn(4, 16, generator=torch.Generator().manual_seed(PROBE_SEED))


def _logits(model):
    import torch

    with torch.no_grad():
        return model(_probe())


def _classify(got, refs: dict) -> str:
    import torch

    matches = [name for name, ref in refs.items() if got.shape == ref.shape and torch.equal(got, ref)]
    return matches[0] if len(matches) == 1 else "mixed"


def _check_save_adapter(target: Path, refs: dict) -> str:
    import lightning_peft as lp

    try:
        model = _tiny(0)
        lp.load_adapter(model, target)
        return _classify(_logits(model.eval()), refs)
    except Exception:  # noqa: BLE001  (any failure to load is a lost save)
        return "lost"


def _check_export(target: Path, refs: dict, rank_of: dict) -> str:
    from safetensors.torch import load_file

    from lightning_peft.merge import MANIFEST_NAME, WEIGHTS_NAME

    from lightning_peft.atomic import recover_directory

    try:
        if not target.exists() and recover_directory(target):
            # the fallback swap's window: a reader without lightning-peft finds no directory; the old
            # version is beside it and comes back (next export, or any lightning-peft loader)
            return "recovered" if _check_export(target, refs, rank_of) == "old" else "lost"
        model = _tiny(0)
        model.load_state_dict(load_file(str(target / WEIGHTS_NAME)), strict=True)
        manifest = json.loads((target / MANIFEST_NAME).read_text())
    except Exception:  # noqa: BLE001
        return "lost"
    verdict = _classify(_logits(model.eval()), refs)
    if verdict != "mixed" and manifest["adapter_config"]["r"] != rank_of[verdict]:
        return "mixed"  # the weights of one export, the metadata of the other
    return verdict


def _save_loop(kind: str, target: Path, versions: dict) -> None:
    """The child: save the versions alternately, forever (until killed)."""
    import lightning_peft as lp

    names = list(versions)
    i = 1
    while True:
        model = versions[names[i % 2]]
        if kind == "save_adapter":
            lp.save_adapter(model, target)
        else:
            lp.export_merged(model, target, dtype=__import__("torch").float32)
        i += 1


def _serve_versions(kind: str, trials: int, workdir: Path, rng: random.Random) -> dict:
    import lightning_peft as lp

    versions = {"old": _version(1, r=4, alpha=8), "new": _version(2, r=8, alpha=32)}
    rank_of = {"old": 4, "new": 8}
    target = workdir / kind
    if kind == "save_adapter":
        refs = {name: _logits(m) for name, m in versions.items()}
        save = lambda m: lp.save_adapter(m, target)
        check = lambda: _check_save_adapter(target, refs)
    else:
        import torch

        refs = {}
        for name, m in versions.items():
            lp.export_merged(m, workdir / f"ref-{name}", dtype=torch.float32)
            refs[name] = None
        for name in versions:
            probe = _tiny(0)
            from safetensors.torch import load_file

            probe.load_state_dict(load_file(str(workdir / f"ref-{name}" / "model.safetensors")))
            refs[name] = _logits(probe.eval())
        save = lambda m: lp.export_merged(m, target, dtype=torch.float32)
        check = lambda: _check_export(target, refs, rank_of)
    started = time.perf_counter()
    for _ in range(5):
        save(versions["new"])
        save(versions["old"])
    per_save = (time.perf_counter() - started) / 10
    counts = {"old": 0, "new": 0, "mixed": 0, "lost": 0, "recovered": 0}
    most_leftovers = 0
    for _ in range(trials):
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            try:
                _quiet()
                _save_loop(kind, target, versions)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 4 * per_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        most_leftovers = max(most_leftovers, _count_leftovers(target.parent))
        counts[check()] += 1
    return {"path": kind, "trials": trials, **counts, "per_save_ms": round(1000 * per_save, 2),
            "most_leftovers": most_leftovers}


def _quiet() -> None:
    """A child's output (Lightning's banners) goes nowhere."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)


def _count_leftovers(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------- AdapterCheckpoint trials
def _trainer_child(dirpath: Path, records: Path) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    import lightning_peft as lp
    from lightning_peft.atomic import atomic_write
    from lightning_peft.callbacks import AdapterCheckpoint

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _tiny(0)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            self.log("step", float(self.global_step + 1))  # monitored: top-2 = the two newest saves
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    class Record(Callback):  # runs before AdapterCheckpoint (Lightning puts checkpoints last)
        def on_train_batch_end(self, trainer, pl_module, *args):
            logits = _logits(pl_module.model.eval())
            pl_module.model.train()
            atomic_write(records / f"{trainer.global_step}.pt", lambda tmp: torch.save(logits, tmp))

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # one step an epoch
    checkpoint = AdapterCheckpoint(dirpath, monitor="step", mode="max", save_top_k=2, every_n_train_steps=1,
                                      save_last=True)
    trainer = L.Trainer(strategy=lp.PEFTStrategy(peft_config=lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
                        max_steps=10**6, callbacks=[Record(), checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    last = dirpath / "last"
    trainer.fit(Module(), loader, ckpt_path=str(last) if last.is_dir() else None)


def _check_checkpoints(dirpath: Path, records: Path) -> tuple[str, int]:
    """``last`` and every other visible save load, give the logits recorded for their step, and
    their adapter files agree with their own ``training_state.ckpt``. Returns (verdict, newest step)."""
    import torch

    import lightning_peft as lp
    from lightning_peft.checkpoint import read_training_state

    saves = {dirpath / "last"} | {p for p in dirpath.iterdir() if not p.name.startswith(".")}
    newest = -1
    for save in sorted(saves):
        try:
            state = read_training_state(save)  # first, as fit(ckpt_path=...) would: recovers an interrupted swap
            step = state["global_step"]
            model = _tiny(0)
            lp.load_adapter(model, save)
            got = _logits(model.eval())
            expected = torch.load(records / f"{step}.pt", weights_only=True)
            twin = _tiny(0)  # the same adapters, from the training state instead of the adapter files
            lp.inject_adapters(twin, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
            twin.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=False)
            from_state = _logits(twin.eval())
        except Exception:  # noqa: BLE001
            return "lost", -1
        if not (torch.equal(got, expected) and torch.equal(from_state, expected)):
            return "mixed", -1
        newest = max(newest, step)
    return "new", newest


def _serve_checkpoint(trials: int, workdir: Path, rng: random.Random) -> dict:
    import shutil

    dirpath, records = workdir / "ckpt", workdir / "records"
    (records / "warm").mkdir(parents=True)
    counts = {"old": 0, "new": 0, "mixed": 0, "lost": 0, "recovered": 0}
    # how long a child takes to start training and save a few steps: kills land over that span
    _trainer_child_steps(dirpath, records)  # here, not forked: loads Lightning's lazy imports once for all children
    started = time.perf_counter()
    _trainer_child_steps(dirpath / "warm", records / "warm")
    span = time.perf_counter() - started
    shutil.rmtree(dirpath / "warm")
    most_leftovers, previous = 0, -1
    for _ in range(trials):
        pid = os.fork()
        if pid == 0:
            try:
                _quiet()
                _trainer_child(dirpath, records)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.45 * span, 1.05 * span))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        most_leftovers = max(most_leftovers, _count_leftovers(dirpath) if dirpath.is_dir() else 0)
        verdict, newest = _check_checkpoints(dirpath, records)
        if verdict == "new" and newest <= previous:
            verdict = "old"  # nothing new was saved before the kill: the previous saves stand
        previous = max(previous, newest)
        counts[verdict] += 1
    return {"path": "adapter_checkpoint", "trials": trials, **counts, "per_save_ms": None,
            "most_leftovers": most_leftovers, "steps_saved": previous}


def _trainer_child_steps(dirpath: Path, records: Path) -> None:
    """Train three steps to the end (seeds ``last``; timed, it gives the span kills land in)."""
    import lightning as L

    real_trainer = L.Trainer

    def few_steps(*args, **kwargs):
        kwargs["max_steps"] = 3
        return real_trainer(*args, **kwargs)

    L.Trainer = few_steps
    try:
        _trainer_child(dirpath, records)
    finally:
        L.Trainer = real_trainer


def serve(kind: str, trials: int = 50, seed: int = 0, swap: str = "exchange") -> dict:
    """Run the kill trials of one save path from this process (it forks the savers; the model is
    tiny, so no torch op here runs threaded) and return the counts."""
    import torch

    import lightning_peft.atomic as atomic

    threads, exchange = torch.get_num_threads(), getattr(atomic, "_RENAMEAT2", None)
    torch.set_num_threads(1)  # forked children must not inherit a live OpenMP pool
    if swap == "rename":
        atomic._RENAMEAT2 = None  # the fallback: rename aside, rename in, recover on load
    rng = random.Random(seed)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"lp-kill-{kind}-") as tmp:
            if kind == "adapter_checkpoint":
                result = _serve_checkpoint(trials, Path(tmp), rng)
            else:
                result = _serve_versions(kind, trials, Path(tmp), rng)
        result["swap"] = "exchange" if getattr(atomic, "_RENAMEAT2", None) is not None else "rename"
    finally:
        torch.set_num_threads(threads)
        atomic._RENAMEAT2 = exchange
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


# --------------------------------------------------------------------------------- the driver
def sweep() -> list[dict] | None:
    """h18a's bad-input sweep (``scripts/reliability_inputs.py``), if present."""
    sys.path.insert(0, str(HERE))
    try:
        from reliability_inputs import run_sweep
    except ImportError:
        return None
    return run_sweep()


def table(kills: list[dict], rows: list[dict] | None) -> str:
    lines = ["| check | tried | old / new complete or clear error | silent (mixed) | data lost | tracebacks |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in kills:
        recovered = f" (+{r['recovered']} missing, old recovered)" if r.get("recovered") else ""
        lines.append(f"| kill -9 during `{r['path']}` ({r['swap']}) | {r['trials']} | {r['old']} / {r['new']}{recovered} | "
                     f"{r['mixed']} | {r['lost']} | 0 |")
    if rows is not None:
        outcomes = [row["outcome"] for row in rows]
        lines.append(f"| malformed inputs (`reliability_inputs.run_sweep`) | {len(rows)} | "
                     f"{outcomes.count('clear_error')} | {outcomes.count('silent')} | {outcomes.count('lost')} | "
                     f"{outcomes.count('traceback')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50, help="kill trials per save path (default 50)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--swap", choices=("exchange", "rename"), default="exchange",
                        help="exchange: renameat2(RENAME_EXCHANGE) (Linux default); rename: the two-rename fallback")
    parser.add_argument("--no-sweep", action="store_true", help="kill trials only")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    started = time.perf_counter()
    kills = [serve(kind, args.trials, args.seed, args.swap) for kind in args.paths.split(",")]
    rows = None if args.no_sweep else sweep()
    bad = sum(r["mixed"] + r["lost"] for r in kills)
    if rows is not None:
        bad += sum(row["outcome"] != "clear_error" for row in rows)
    if args.json:
        print(json.dumps({"kill_trials": kills, "sweep": rows, "seconds": round(time.perf_counter() - started, 1)}))
    else:
        print(table(kills, rows))
        if rows is None:
            print("(bad-input sweep: scripts/reliability_inputs.py not found)")
        print(f"\n{sum(r['trials'] for r in kills)} kill trials in {time.perf_counter() - started:.0f} s; "
              f"{'all held' if not bad else f'{bad} FAILED'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
