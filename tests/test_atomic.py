"""atomic_write: a failed write leaves the old file; files get ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from lightning_peft.atomic import atomic_write


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.txt"
    atomic_write(path, lambda tmp: tmp.write_text("old"))

    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]


def test_new_file_follows_umask_even_when_writer_makes_it_private(tmp_path):
    # safetensors creates its files 0o600; a saved adapter must be readable like any other file
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == 0o644


def test_replacing_keeps_the_existing_files_mode(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"")
    os.chmod(path, 0o640)
    atomic_write(path, lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
