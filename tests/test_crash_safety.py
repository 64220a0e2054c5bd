"""Whole-directory atomicity (kill -9 trials and every intermediate state) and full disks.

The kill trials fork a saver from this process, SIGKILL it at a random moment, and load what is
left (scripts/reliability.py does the same with more trials)."""

from __future__ import annotations

import errno
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch

import lightning_peft as lp
import lightning_peft.atomic as atomic
from lightning_peft.atomic import StorageFullError, atomic_directory, leftovers, remove_directory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import reliability  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kill trials fork a saver")


def _aside(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex}")


# ------------------------------------------------------------------------------- kill -9 trials
@pytest.mark.parametrize("kind", ["save_adapter", "export_merged"])
def test_kill_during_save_leaves_exactly_the_old_or_the_new_version(kind):
    result = reliability.serve(kind, trials=20, seed=1)
    assert result["mixed"] == 0 and result["lost"] == 0, result
    assert result["old"] + result["new"] == 20
    assert result["old"] > 0 and result["new"] > 0, result  # the kills landed at different points of a save
    assert result["most_leftovers"] <= 2, result  # leftovers are cleaned by the next save, not piling up


def test_kill_during_adapter_checkpoint_training_leaves_every_save_whole():
    # top-2 by step (a prune every step), `last` replaced every step, each child resuming from `last`
    result = reliability.serve("adapter_checkpoint", trials=20, seed=2)
    assert result["mixed"] == 0 and result["lost"] == 0, result
    assert result["new"] > 0 and result["steps_saved"] > 3, result  # training went on across the kills
    assert result["most_leftovers"] <= 2, result


# --------------------------------------------------------------------- every intermediate state
def _two_versions():
    return reliability._version(1, r=4, alpha=8), reliability._version(2, r=8, alpha=32)


def _loaded_logits(directory):
    model = reliability._tiny(0)
    lp.load_adapter(model, directory)
    return reliability._logits(model.eval())


def test_old_version_aside_and_target_missing_is_recovered_by_the_loader(tmp_path):
    # the fallback swap (no renameat2) stopped between "rename old aside" and "rename new in"
    old, new = _two_versions()
    target = tmp_path / "adapter"
    lp.save_adapter(old, target)
    aside = _aside(target, "old")
    os.rename(target, aside)
    half = _aside(target, "tmp")
    lp.save_adapter(new, half)  # the complete new version, not yet renamed in
    assert torch.equal(_loaded_logits(target), reliability._logits(old))
    assert not aside.exists()
    lp.save_adapter(new, target)  # the next save removes the leftover
    assert leftovers(target) == [] and torch.equal(_loaded_logits(target), reliability._logits(new))


def test_fallback_swap_failing_between_renames_keeps_the_old_version(tmp_path, monkeypatch):
    old, new = _two_versions()
    target = tmp_path / "adapter"
    lp.save_adapter(old, target)
    monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    real_rename = os.rename
    calls = []

    def failing_second_rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real_rename(a, b)

    monkeypatch.setattr(atomic.os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="I/O error"):
        lp.save_adapter(new, target)
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert ".old-" in str(calls[0][1]) and not target.exists()  # the window the loader must cover
    assert torch.equal(_loaded_logits(target), reliability._logits(old))
    lp.save_adapter(new, target)
    assert torch.equal(_loaded_logits(target), reliability._logits(new)) and leftovers(target) == []


def test_exchange_swaps_in_one_step_when_the_os_has_it(tmp_path, monkeypatch):
    if atomic._RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    old, new = _two_versions()
    target = tmp_path / "adapter"
    lp.save_adapter(old, target)
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    lp.save_adapter(new, target)
    assert renames == []  # no window in which target is missing
    assert torch.equal(_loaded_logits(target), reliability._logits(new))


def test_leftovers_are_refused_by_name_and_removed_by_the_next_save(tmp_path):
    old, new = _two_versions()
    target = tmp_path / "adapter"
    lp.save_adapter(old, target)
    stale = _aside(target, "tmp")
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="still being written"):
        lp.load_adapter(reliability._tiny(0), stale)
    lp.save_adapter(new, target)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_adapter_keeps_foreign_files_and_replaces_its_own(tmp_path):
    old, new = _two_versions()
    target = tmp_path / "adapter"
    lp.save_adapter(old, target)
    (target / "notes.txt").write_text("my notes")
    (target / "adapter_model.bin").write_bytes(b"stale pickle")  # ours: an old PEFT save's weights
    lp.save_adapter(old, target / "second")  # another adapter's sub-folder, PEFT's layout
    lp.save_adapter(new, target)
    assert (target / "notes.txt").read_text() == "my notes"
    assert not (target / "adapter_model.bin").exists()
    assert torch.equal(_loaded_logits(target / "second"), reliability._logits(old))
    assert torch.equal(_loaded_logits(target), reliability._logits(new))


def test_pruning_renames_before_deleting_so_a_half_deleted_save_is_never_a_checkpoint(tmp_path, monkeypatch):
    old, _ = _two_versions()
    target = tmp_path / "epoch=0-step=1"
    lp.save_adapter(old, target)
    torch.save({"global_step": 1}, target / "training_state.ckpt")

    def crash_halfway(path, ignore_errors=False):
        (Path(path) / "adapter_model.safetensors").unlink()
        raise KeyboardInterrupt  # the process dies mid-delete

    monkeypatch.setattr(atomic.shutil, "rmtree", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        remove_directory(target)
    monkeypatch.undo()
    assert not target.exists()  # the half-deleted save is not under a save's name
    (trash,) = leftovers(target)
    assert ".trash-" in trash.name
    from lightning_peft.checkpoint import read_training_state

    with pytest.raises(ValueError, match="being deleted"):
        read_training_state(trash)  # what fit(ckpt_path=...) reads
    with pytest.raises(ValueError, match="being deleted"):
        lp.load_adapter(reliability._tiny(0), trash)


def test_atomic_directory_failure_changes_nothing(tmp_path):
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ------------------------------------------------------------------------------------ full disk
def test_disk_full_mid_save_names_the_path_and_keeps_the_previous_adapter(tmp_path, monkeypatch):
    old, new = _two_versions()
    target = tmp_path / "adapter"
    lp.save_adapter(old, target)
    import lightning_peft.checkpoint as checkpoint

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # part of the file made it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(StorageFullError, match="disk is full") as caught:
        lp.save_adapter(new, target)
    assert str(target) in str(caught.value) and caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(_loaded_logits(target), reliability._logits(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_torch_save_unexpected_pos_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    # how torch.save reports ENOSPC: the AdapterCheckpoint path writes training_state.ckpt with it
    from lightning_peft.callbacks import adapter_checkpoint

    old, _ = _two_versions()
    target = tmp_path / "last"

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4310")

    monkeypatch.setattr(adapter_checkpoint.torch, "save", full)
    with pytest.raises(StorageFullError, match=f"cannot save {target}: the disk is full"):
        adapter_checkpoint._write_directory(target, old, {"state_dict": {}})
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"), (errno.EDQUOT, "quota")])
def test_read_only_and_quota_errors_say_so(tmp_path, monkeypatch, code, words):
    old, _ = _two_versions()
    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if ".tmp-" in self.name:
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(StorageFullError, match=words):
        lp.export_merged(old, tmp_path / "export")
