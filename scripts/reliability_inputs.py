"""The bad-input sweep: malformed adapter directories and checkpoints through every entry point.

    python scripts/reliability_inputs.py              # a table of every input, then the totals
    python scripts/reliability_inputs.py --markdown   # one line per input (docs/reliability.md's table)

Each input is built from a good save (a LoRA adapter of ``lightning_peft.toy.TinyCausalLM``, an
``AdapterCheckpoint`` directory and a ``.ckpt`` of one training step) by damaging one thing: the
config JSON (every kind of invalid JSON, wrong types, values no training produces), the
safetensors file (truncation, headers, dtypes, shapes, keys, NaN, flipped bits), the checksum
file, symlinks leading out of the directory, pickles that would run code, adapter names that are
paths. Adapter directories go through ``load_adapter``, ``lightning-peft inspect`` and
``lightning-peft merge``; checkpoints through ``trainer.fit(ckpt_path=...)`` and
``restore_adapters``. Each try ends in one outcome:

- ``clear_error``: a ``ValueError`` / ``OSError`` whose message names the file, directory or
  field (the CLI: exit status 2 and one ``lightning-peft <command>: error: ...`` line on stderr);
- ``silent``: the call succeeded on an input that cannot be right;
- ``lost``: the call failed but changed something it should not have: the input files, the
  model it was given (adapters left behind, base weights changed), an earlier export;
- ``traceback``: any other exception (what a user would see as an unexplained traceback).

Target: 0 silent, 0 lost, 0 traceback. ``scripts/reliability.py`` imports :func:`run_sweep`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

OUTCOMES = ("clear_error", "silent", "lost", "traceback")
BASE_SPEC = "lightning_peft.toy.TinyCausalLM"  # the CLI's --base: the same weights every time (init_seed)


# --------------------------------------------------------------------------------- helpers
def _base():
    from lightning_peft.toy import TinyCausalLM

    return TinyCausalLM(hidden_size=32, num_layers=1)


def _st_split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(path: Path, header: dict | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _save_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        config = json.loads((d / "adapter_config.json").read_text())
        config.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(config))  # NaN / Infinity as Python's json writes them
    return edit


def _write_config(raw: bytes) -> Callable[[Path], None]:
    return lambda d: (d / "adapter_config.json").write_bytes(raw)


def _no_sums(edit: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage the weights as a directory without checksums (PEFT's) would hold them: only the deeper checks see it."""
    def run(d: Path) -> None:
        (d / "lightning_peft_checksums.json").unlink(missing_ok=True)
        edit(d)
    return run


def _edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        tensors = _tensors(d / "adapter_model.safetensors")
        change(tensors)
        _save_tensors(d, tensors)
    return _no_sums(edit)


def _first(kind: str) -> Callable[[dict], str]:
    return lambda tensors: sorted(k for k in tensors if kind in k)[0]


def _set(kind: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def change(tensors):
        key = _first(kind)(tensors)
        tensors[key] = make(tensors[key])
    return _edit_tensors(change)


def _header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        header, body = _st_split(d / "adapter_model.safetensors")
        change(header)
        _st_join(d / "adapter_model.safetensors", header, body)
    return _no_sums(edit)


def _first_entry(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def _bytes(change: Callable[[bytes], bytes], keep_sums: bool = False) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        path = d / "adapter_model.safetensors"
        path.write_bytes(change(path.read_bytes()))
    return edit if keep_sums else _no_sums(edit)


def _symlink(name: str, target: Callable[[Path], str]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / name).unlink()
        os.symlink(target(d), d / name)
    return edit


def _outside_file(d: Path) -> str:
    outside = d.parent / f"outside-{d.name}.txt"
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
    return str(outside)


class _RunsCode:
    """Unpickling this creates a marker file: a pickle that would run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _pickled_adapter(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()
    (d / "lightning_peft_checksums.json").unlink(missing_ok=True)
    torch.save({"x": _RunsCode(str(d.parent / f"{d.name}.ran"))}, d / "adapter_model.bin")


def _deep(n: int = 100_000) -> bytes:
    return b"[" * n + b"]" * n


# (description, damage) for adapter directories; every one is an input no save could have produced
ADAPTER_INPUTS: list[tuple[str, Callable[[Path], None]]] = [
    # the directory itself
    ("no adapter_config.json", lambda d: (d / "adapter_config.json").unlink()),
    ("no adapter_model.safetensors", lambda d: (d / "adapter_model.safetensors").unlink()),
    ("empty directory", lambda d: [p.unlink() for p in d.iterdir()]),
    ("adapter_config.json is a directory", lambda d: ((d / "adapter_config.json").unlink(),
                                                      (d / "adapter_config.json").mkdir())),
    ("adapter_model.safetensors is a directory", lambda d: ((d / "adapter_model.safetensors").unlink(),
                                                            (d / "adapter_model.safetensors").mkdir())),
    ("pickled adapter_model.bin that would run code", _pickled_adapter),
    # symlinks
    ("weights: symlink out of the directory to a text file", _symlink("adapter_model.safetensors", _outside_file)),
    ("weights: dangling symlink", _symlink("adapter_model.safetensors", lambda d: str(d / "missing"))),
    ("weights: symlink loop", lambda d: ((d / "adapter_model.safetensors").unlink(),
                                         os.symlink("adapter_model.safetensors", d / "adapter_model.safetensors"))),
    ("weights: symlink to /dev/zero", _symlink("adapter_model.safetensors", lambda d: "/dev/zero")),
    ("config: symlink to /dev/zero", _symlink("adapter_config.json", lambda d: "/dev/zero")),
    ("config: symlink out of the directory to a text file", _symlink("adapter_config.json", _outside_file)),
    # config: not JSON, not an object
    ("config: empty file", _write_config(b"")),
    ("config: truncated JSON", lambda d: (d / "adapter_config.json").write_bytes(
        (d / "adapter_config.json").read_bytes()[:40])),
    ("config: invalid UTF-8", _write_config(b'{"peft_type": "LORA", "r": 2, "x": "\xff\xfe"}')),
    ("config: UTF-16 with BOM", lambda d: (d / "adapter_config.json").write_bytes(
        (d / "adapter_config.json").read_text().encode("utf-16"))),
    ("config: nested 100,000 deep", _write_config(_deep())),
    ("config: object nested 100,000 deep", _write_config(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)),
    ("config: 20 MB of spaces", lambda d: (d / "adapter_config.json").write_bytes(b" " * (20 * 2**20) + b"{}")),
    ("config: a JSON list", _write_config(b'[{"peft_type": "LORA"}]')),
    ("config: JSON null", _write_config(b"null")),
    ("config: a JSON string", _write_config(b'"LORA"')),
    ("config: a JSON number", _write_config(b"2")),
    ("config: NUL bytes", _write_config(b"\x00" * 64)),
    # config: wrong types and values
    ("config: peft_type unknown", _edit_config(peft_type="LOHA")),
    ("config: peft_type a list", _edit_config(peft_type=["LORA"])),
    ("config: peft_type null", _edit_config(peft_type=None)),
    ("config: r a string", _edit_config(r="2")),
    ("config: r = 0", _edit_config(r=0)),
    ("config: r = -2", _edit_config(r=-2)),
    ("config: r = 2.5", _edit_config(r=2.5)),
    ("config: r = true", _edit_config(r=True)),
    ("config: r a list", _edit_config(r=[2])),
    ("config: r = 4 (file has rank 2)", _edit_config(r=4)),
    ("config: lora_alpha NaN", _edit_config(lora_alpha=math.nan)),
    ("config: lora_alpha Infinity", _edit_config(lora_alpha=math.inf)),
    ("config: lora_alpha -Infinity", _edit_config(lora_alpha=-math.inf)),
    ("config: lora_alpha = 0", _edit_config(lora_alpha=0)),
    ("config: lora_alpha = -16", _edit_config(lora_alpha=-16)),
    ("config: lora_alpha = 1e308", _edit_config(lora_alpha=1e308)),
    ("config: lora_alpha a string", _edit_config(lora_alpha="16")),
    ("config: alpha_pattern NaN", _edit_config(alpha_pattern={"q_proj": math.nan})),
    ("config: alpha_pattern a list", _edit_config(alpha_pattern=[1])),
    ("config: rank_pattern 0", _edit_config(rank_pattern={"q_proj": 0})),
    ("config: rank_pattern bad regex key", _edit_config(rank_pattern={"q_proj(": 2})),
    ("config: lora_dropout = 1.5", _edit_config(lora_dropout=1.5)),
    ("config: lora_dropout NaN", _edit_config(lora_dropout=math.nan)),
    ("config: lora_dropout a string", _edit_config(lora_dropout="0.1")),
    ("config: target_modules a number", _edit_config(target_modules=5)),
    ("config: target_modules bad regex", _edit_config(target_modules="q_proj(")),
    ("config: target_modules names nothing here", _edit_config(target_modules=["nope_proj"])),
    ("config: target_modules an object", _edit_config(target_modules={"q_proj": 1})),
    ("config: modules_to_save a number", _edit_config(modules_to_save=5)),
    ("config: init_lora_weights unknown", _edit_config(init_lora_weights="olora")),
    ("config: use_dora a string", _edit_config(use_dora="yes")),
    ("config: use_dora true (no magnitudes in the file)", _edit_config(use_dora=True)),
    ("config: bias unknown", _edit_config(bias="some")),
    ("config: layers_to_transform a string", _edit_config(layers_to_transform="0")),
    ("config: peft_type IA3 over LoRA weights", _edit_config(peft_type="IA3")),
    ("config: peft_type PROMPT_TUNING over LoRA weights", _edit_config(peft_type="PROMPT_TUNING")),
    # safetensors bytes
    ("weights: empty file", _bytes(lambda b: b"")),
    ("weights: truncated to half", _bytes(lambda b: b[: len(b) // 2])),
    ("weights: truncated to half (checksum kept)", _bytes(lambda b: b[: len(b) // 2], keep_sums=True)),
    ("weights: 7 bytes", _bytes(lambda b: b[:7])),
    ("weights: header length only", _bytes(lambda b: b[:8])),
    ("weights: header length 2^63", _bytes(lambda b: struct.pack("<Q", 2**63) + b[8:])),
    ("weights: header length past the end", _bytes(lambda b: struct.pack("<Q", len(b)) + b[8:])),
    ("weights: header claims 200 MB", _bytes(lambda b: struct.pack("<Q", 200 * 2**20) + b[8:])),
    ("weights: header not JSON", _bytes(lambda b: b[:8] + b"\x00" * struct.unpack("<Q", b[:8])[0]
                                        + b[8 + struct.unpack("<Q", b[:8])[0]:])),
    ("weights: header a JSON list", _no_sums(lambda d: _st_join(d / "adapter_model.safetensors", b"[1, 2, 3]", b""))),
    ("weights: random bytes", _bytes(lambda b: os.urandom(len(b)))),
    ("weights: one flipped bit (checksum kept)", _bytes(lambda b: b[:-5] + bytes([b[-5] ^ 0x10]) + b[-4:],
                                                         keep_sums=True)),
    ("weights: offsets past the data", _header(lambda h: _first_entry(h).update(data_offsets=[0, 10**9]))),
    ("weights: offsets reversed", _header(lambda h: _first_entry(h).update(
        data_offsets=_first_entry(h)["data_offsets"][::-1]))),
    ("weights: offsets overlapping", _header(lambda h: [e.update(data_offsets=[0, e["data_offsets"][1]
                                                                                - e["data_offsets"][0]])
                                                        for k, e in h.items() if k != "__metadata__"])),
    ("weights: unknown dtype", _header(lambda h: _first_entry(h).update(dtype="X9"))),
    ("weights: shape disagrees with offsets", _header(lambda h: _first_entry(h).update(shape=[3, 3, 3]))),
    ("weights: negative shape", _header(lambda h: _first_entry(h).update(shape=[-1, 2]))),
    ("weights: __metadata__ not strings", _header(lambda h: h.update(__metadata__={"format": 1}))),
    ("weights: lora_A as int64", _set("lora_A", lambda t: t.to(torch.int64))),
    ("weights: lora_B as bool", _set("lora_B", lambda t: t != 0)),
    ("weights: lora_A transposed", _set("lora_A", lambda t: t.t().contiguous())),
    ("weights: lora_A of rank 3", _set("lora_A", lambda t: torch.zeros(3, t.shape[1]))),
    ("weights: lora_A as a 3-D tensor", _set("lora_A", lambda t: t[None].contiguous())),
    ("weights: a scalar tensor", _set("lora_A", lambda t: torch.tensor(1.0))),
    ("weights: NaN in lora_B", _set("lora_B", lambda t: t.fill_(math.nan))),
    ("weights: one inf in lora_A", _set("lora_A", lambda t: t.index_put_((torch.tensor([0]),), torch.tensor(math.inf)))),
    ("weights: a key missing", _edit_tensors(lambda ts: ts.pop(_first("lora_B")(ts)))),
    ("weights: an unknown key", _edit_tensors(lambda ts: ts.update({"base_model.model.model.nope.lora_A.weight":
                                                                    torch.zeros(2, 2)}))),
    ("weights: a key with a path traversal", _edit_tensors(lambda ts: ts.update(
        {"base_model.model.../../etc.lora_A.weight": torch.zeros(2, 2)}))),
    ("weights: no tensors at all", _edit_tensors(lambda ts: ts.clear())),
    # checksum file
    ("checksums: not JSON", lambda d: (d / "lightning_peft_checksums.json").write_text("{")),
    ("checksums: a JSON list", lambda d: (d / "lightning_peft_checksums.json").write_text("[]")),
    ("checksums: digest a number", lambda d: (d / "lightning_peft_checksums.json").write_text(
        json.dumps({"sha256": {"adapter_model.safetensors": 5}}))),
    ("checksums: wrong digest", lambda d: (d / "lightning_peft_checksums.json").write_text(
        json.dumps({"sha256": {"adapter_model.safetensors": "0" * 64}}))),
]


# ----------------------------------------------------------------------------- outcomes
def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks by their target text, not followed)."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            state[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _model_state(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _first_line(text: str, limit: int = 110) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _judge_exception(err: BaseException, names: list[str]) -> tuple[str, str]:
    message = str(err)
    if isinstance(err, (ValueError, OSError)) and not isinstance(err, UnicodeError) and any(n in message for n in names):
        return "clear_error", _first_line(message)
    return "traceback", f"{type(err).__name__}: {_first_line(message)}"


def _run_cli(argv: list[str]) -> tuple[str, str]:
    from lightning_peft.cli import main

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(argv)
    except BaseException as exc:  # what would reach the user as a traceback (SystemExit: argparse's own exit)
        if isinstance(exc, SystemExit) and exc.code == 2 and err.getvalue().strip():
            return "clear_error", _first_line(err.getvalue().strip().splitlines()[-1])
        return "traceback", f"{type(exc).__name__}: {_first_line(str(exc))}"
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        return "silent", "exit 0"
    if code == 2 and lines and f"lightning-peft {argv[0]}: error:" in lines[-1] and "Traceback" not in err.getvalue():
        return "clear_error", _first_line(lines[-1])
    return "traceback", f"exit {code}: {_first_line(err.getvalue())}"


def _try_adapter(entry: str, directory: Path, work: Path) -> tuple[str, str]:
    import lightning_peft as lp
    from lightning_peft.inject import adapter_configs

    names = [str(directory), directory.name, "adapter_config.json", "adapter_model.safetensors"]
    before = _snapshot(directory.parent)
    if entry == "load_adapter":
        model = _base().model
        state = _model_state(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lp.load_adapter(model, directory)
        except BaseException as err:  # noqa: BLE001 (judged below)
            outcome = _judge_exception(err, names)
            if adapter_configs(model) or _model_state(model) != state:
                outcome = ("lost", f"the model was changed by a failed load: {outcome[1]}")
        else:
            outcome = ("silent", "loaded")
    elif entry == "inspect":
        outcome = _run_cli(["inspect", str(directory)])
    else:  # merge: an earlier export in --out must survive a failed merge
        out = work / f"merged-{directory.name}"
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"an earlier export")
        outcome = _run_cli(["merge", "--base", BASE_SPEC, "--adapter", str(directory), "--out", str(out),
                            "--dtype", "float32"])
        if outcome[0] != "silent" and (out / "model.safetensors").read_bytes() != b"an earlier export":
            outcome = ("lost", f"a failed merge replaced the earlier export: {outcome[1]}")
        before.pop(str(out / "model.safetensors"), None)
    after = _snapshot(directory.parent)
    after = {k: v for k, v in after.items() if "merged-" not in k}
    before = {k: v for k, v in before.items() if "merged-" not in k}
    if outcome[0] != "lost" and after != before:
        changed = sorted(set(before.items()) ^ set(after.items()))
        outcome = ("lost", f"the input changed on disk: {changed[0][0]}")
    return outcome


# ------------------------------------------------------------------------------ checkpoints
def _train_checkpoints(root: Path) -> tuple[Path, Path]:
    """A one-step ``lora`` run of the tiny model: its ``.ckpt`` and its ``AdapterCheckpoint`` save."""
    import lightning as L

    from lightning_peft.callbacks import AdapterCheckpoint
    from lightning_peft.toy import SyntheticTokens

    trainer = L.Trainer(strategy="lora", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[AdapterCheckpoint(dirpath=root / "adapters")])
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer.fit(_base(), SyntheticTokens(num_sequences=8, val_sequences=8, seq_len=8))
        trainer.save_checkpoint(root / "run.ckpt")
    return root / "run.ckpt", root / "adapters" / "last"


def _ckpt_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)
    return edit


def _meta_adapter(checkpoint: dict) -> dict:
    return next(iter(checkpoint["lightning_peft"]["adapters"].values()))


def _first_state_key(checkpoint: dict) -> str:
    return sorted(k for k in checkpoint["state_dict"] if "lora_B" in k)[0]


# (description, damage, as_directory): the damage gets the .ckpt file (or the save's training_state.ckpt)
CHECKPOINT_INPUTS: list[tuple[str, Callable[[Path], None], bool]] = [
    ("ckpt: a pickle that would run code", lambda p: torch.save(
        {"state_dict": {}, "x": _RunsCode(str(p.parent / f"{p.name}.ran"))}, p), False),
    ("save dir: training_state.ckpt a pickle that would run code", lambda p: torch.save(
        {"state_dict": {}, "x": _RunsCode(str(p.parent / f"{p.name}.ran"))}, p), True),
    ("ckpt: empty file", lambda p: p.write_bytes(b""), False),
    ("save dir: empty training_state.ckpt", lambda p: p.write_bytes(b""), True),
    ("ckpt: truncated to half", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), False),
    ("ckpt: random bytes", lambda p: p.write_bytes(os.urandom(4096)), False),
    ("ckpt: a tensor, not a dict", lambda p: torch.save(torch.zeros(3), p), False),
    ("ckpt: a list", lambda p: torch.save([1, 2], p), False),
    ("ckpt: no state_dict", _ckpt_edit(lambda c: c.pop("state_dict")), False),
    ("ckpt: lightning_peft entry a string", _ckpt_edit(lambda c: c.update(lightning_peft="x")), False),
    ("ckpt: adapter config with lora_alpha NaN", _ckpt_edit(lambda c: _meta_adapter(c).update(lora_alpha=math.nan)),
     False),
    ("ckpt: adapter config r a string", _ckpt_edit(lambda c: _meta_adapter(c).update(r="2")), False),
    ("ckpt: adapter name '../x'", _ckpt_edit(lambda c: c["lightning_peft"].update(
        adapters={"../x": _meta_adapter(c)})), False),
    ("ckpt: adapter tensor NaN", _ckpt_edit(lambda c: c["state_dict"][_first_state_key(c)].fill_(math.nan)), False),
    ("ckpt: adapter tensor of another rank", _ckpt_edit(lambda c: c["state_dict"].update(
        {_first_state_key(c): torch.zeros(3, 3)})), False),
    ("ckpt: an adapter tensor missing", _ckpt_edit(lambda c: c["state_dict"].pop(_first_state_key(c))), False),
    ("save dir: no training_state.ckpt", lambda p: p.unlink(), True),
]


def _try_checkpoint(entry: str, path: Path, work: Path) -> tuple[str, str]:
    import lightning as L

    import lightning_peft as lp
    from lightning_peft.inject import adapter_configs
    from lightning_peft.toy import SyntheticTokens

    names = [str(path), path.name, "training_state.ckpt", "lightning_peft"]
    marker_dir = path.parent
    before = _snapshot(path if path.is_dir() else path.parent)
    module = _base()
    state = _model_state(module)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            if entry == "restore_adapters":
                lp.restore_adapters(module, path)
            else:
                L.Trainer(strategy="lora", max_steps=2, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                          default_root_dir=work).fit(module, SyntheticTokens(num_sequences=8, val_sequences=8,
                                                                             seq_len=8), ckpt_path=path)
    except BaseException as err:  # noqa: BLE001 (judged below)
        outcome = _judge_exception(err, names)
        if entry == "restore_adapters" and (adapter_configs(module) or _model_state(module) != state):
            outcome = ("lost", f"the module was changed by a failed restore: {outcome[1]}")
    else:
        outcome = ("silent", "loaded")
    if any(marker_dir.glob("*.ran")):
        outcome = ("lost", "the pickle ran code")
    if outcome[0] != "lost" and _snapshot(path if path.is_dir() else path.parent) != before:
        outcome = ("lost", "the input changed on disk")
    return outcome


# ------------------------------------------------------------------------------------ names
BAD_NAMES = ["../escape", "/tmp/absolute", "a/b", "a\\b", "", ".", "tab\tname", "x" * 256]


def _try_name(name: str, directory: Path) -> tuple[str, str]:
    import lightning_peft as lp
    from lightning_peft.inject import adapter_configs

    model = _base().model
    try:
        lp.load_adapter(model, directory, adapter_name=name)
    except BaseException as err:  # noqa: BLE001
        outcome = _judge_exception(err, ["adapter_name", "adapter name"])
        return ("lost", outcome[1]) if adapter_configs(model) else outcome
    return "silent", "loaded"


# ------------------------------------------------------------------------------------ sweep
def run_sweep(workdir: str | os.PathLike | None = None, every: int = 1) -> list[dict]:
    """Every input through its entry points: ``[{"input", "entry", "outcome", "detail"}]``, where
    ``outcome`` is one of :data:`OUTCOMES`. ``every=n`` tries every n-th input of each kind only
    (the test suite's quick pass)."""
    import lightning_peft as lp

    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        good = root / "good"
        lp.save_adapter(lp.inject_adapters(_base().model, lp.LoraConfig(r=2, init_lora_weights=False)), good)
        rows: list[dict] = []
        for index, (description, damage) in list(enumerate(ADAPTER_INPUTS))[::every]:
            case = root / "adapters" / f"case{index:03d}"
            case.mkdir(parents=True)
            for entry in ("load_adapter", "inspect", "merge"):
                directory = case / entry / "adapter"
                shutil.copytree(good, directory)
                damage(directory)
                outcome, detail = _try_adapter(entry, directory, case / entry)
                rows.append({"input": description, "entry": entry, "outcome": outcome, "detail": detail})
        for name in BAD_NAMES[::every]:
            outcome, detail = _try_name(name, good)
            rows.append({"input": f"adapter name {name[:20]!r}", "entry": "load_adapter", "outcome": outcome,
                         "detail": detail})
        ckpt, save = _train_checkpoints(root / "trained")
        for index, (description, damage, as_directory) in list(enumerate(CHECKPOINT_INPUTS))[::every]:
            for entry in ("ckpt_path", "restore_adapters"):
                case = root / "checkpoints" / f"case{index:03d}-{entry}"
                case.mkdir(parents=True)
                if as_directory:
                    path = case / "save"
                    shutil.copytree(save, path)
                    damage(path / "training_state.ckpt")
                else:
                    path = case / "run.ckpt"
                    shutil.copy(ckpt, path)
                    damage(path)
                outcome, detail = _try_checkpoint(entry, path, case)
                rows.append({"input": description, "entry": entry, "outcome": outcome, "detail": detail})
        return rows


def totals(rows: list[dict]) -> dict[str, int]:
    """``{"inputs": distinct inputs, "tries": rows, outcome: count}``."""
    counts = Counter(row["outcome"] for row in rows)
    return {"inputs": len({row["input"] for row in rows}), "tries": len(rows), **{o: counts.get(o, 0) for o in OUTCOMES}}


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bad-input sweep: each malformed input through each entry point")
    for column in ("input", "entry", "outcome", "message (first line)"):
        table.add_column(column, overflow="fold")
    colour = {"clear_error": "green", "silent": "red", "lost": "red", "traceback": "red"}
    for row in rows:
        table.add_row(row["input"], row["entry"], f"[{colour[row['outcome']]}]{row['outcome']}", row["detail"])
    console = Console()
    console.print(table)
    summary = totals(rows)
    console.print(f"{summary['inputs']} inputs, {summary['tries']} tries: " + ", ".join(
        f"{summary[o]} {o}" for o in OUTCOMES))


def markdown_table(rows: list[dict]) -> str:
    """One line per input: its outcome through each entry point it went through (docs/reliability.md)."""
    entries = ("load_adapter", "inspect", "merge", "ckpt_path", "restore_adapters")
    short = {"clear_error": "clear", "silent": "**silent**", "lost": "**lost**", "traceback": "**traceback**"}
    by_input: dict[str, dict[str, str]] = {}
    for row in rows:
        by_input.setdefault(row["input"], {})[row["entry"]] = short[row["outcome"]]
    lines = ["| input | " + " | ".join(f"`{e}`" for e in entries) + " |", "|---" + "|:-:" * len(entries) + "|"]
    for name, outcomes in by_input.items():
        lines.append(f"| {name.replace('|', '/')} | " + " | ".join(outcomes.get(e, "") for e in entries) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sweep = run_sweep()
    if "--markdown" in sys.argv:
        print(markdown_table(sweep))
        sys.exit(0)
    print_table(sweep)
    result = totals(sweep)
    sys.exit(0 if result["silent"] == result["lost"] == result["traceback"] == 0 else 1)
