"""qlora_ddp with 2 CPU processes (gloo): ranks end identical, rank 0 alone writes checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def test_qlora_ddp_two_processes_stay_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(HERE / "ddp_script.py"), str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "written_by_rank0.ckpt").is_file()
    assert not (tmp_path / "written_by_rank1.ckpt").exists()
    rank0, rank1 = (load_file(tmp_path / f"dump_rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert any(k.startswith("adapter.") for k in rank0) and any(k.startswith("base.") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
