"""Sharded training on CPU with gloo, 2 processes (tests/fsdp_script.py does the runs).

Each sharded run is held against one process training on the same global batch (the loss of
every step), against itself (adapters identical on both ranks, each rank holding half the base),
and against a plain model that loads the adapter it saved (same logits). Multi-node is simulated
with torchrun: 2 "nodes" x 1 process on localhost.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import lightning_peft as lp

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from fsdp_script import LORA, PROBE, QUANT  # noqa: E402
from plain_module import CausalLM, sequences  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}


def _launch(out: Path, *args: str, nodes: int = 1) -> dict[str, list[dict]]:
    """Run fsdp_script.py on 2 processes (Lightning's own launcher, or 2 torchrun "nodes"); the
    per-rank results of each strategy it ran."""
    out.mkdir(parents=True, exist_ok=True)
    script = [str(HERE / "fsdp_script.py"), str(out), *args]
    if nodes == 1:
        runs = [subprocess.Popen([sys.executable, *script], env=ENV, cwd=out, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                  str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                                  str(port), *script, "--nodes", "2"], env=ENV, cwd=out, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for node in range(2)]
    logs = [run.communicate(timeout=240)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), "\n".join(log[-3000:] for log in logs)
    return {name: [json.loads((out / name / f"rank{rank}.json").read_text()) for rank in range(2)]
            for name in args[0].split(",")}


def _global_losses(ranks: list[dict]) -> list[float]:
    """The loss of each step over the global batch: the ranks' means (equal token counts)."""
    return [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]


def _one_process(steps: int, quantization=None) -> list[float]:
    """The reference: one process, the same model (rank 0's), config and global batch of 8."""
    module = CausalLM(seed=0)
    trainer = L.Trainer(strategy=lp.PEFTStrategy(peft_config=lp.LoraConfig(**LORA), quantization=quantization),
                        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, sequences(n=24, batch=8))
    return module.losses


def _adapters_agree_across_ranks(out: Path) -> None:
    rank0, rank1 = (load_file(out / f"adapters_rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(".lora_A." in k for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def _plain_model_reproduces(save: Path, ranks: list[dict], quantize: bool) -> None:
    """The adapter the sharded run saved (PEFT format) loads into a plain, unsharded model and
    gives the sharded model's logits."""
    model = CausalLM(seed=0).model
    if quantize:
        lp.quantize_base(model, lp.QuantConfig(**QUANT))
    lp.load_adapter(model, save)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    sharded = torch.tensor(ranks[0]["logits"])
    torch.testing.assert_close(logits, sharded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ranks[1]["logits"]), sharded, rtol=0, atol=0)


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """lora_fsdp with adapter dropout 0.1, saved every 3 steps (each an epoch end)."""
    out = tmp_path_factory.mktemp("fsdp_dropout")
    return out, _launch(out, "lora_fsdp", "6", "--ckpt-every", "3", "--dropout", "0.1")["lora_fsdp"]


def test_lora_fsdp_shards_the_base_and_saves_adapters_a_plain_model_loads(dropout_run):
    out, ranks = dropout_run
    assert all(r["sharded"] and r["world_size"] == 2 for r in ranks)
    for r in ranks:  # each rank holds its half of every frozen base tensor
        assert abs(r["held_bytes"] / r["base_bytes"] - 0.5) < 0.01, r
    _adapters_agree_across_ranks(out / "lora_fsdp")
    _plain_model_reproduces(out / "lora_fsdp" / "ckpt" / "last", ranks, quantize=False)


def test_lora_fsdp_resumes_on_two_simulated_nodes_with_each_ranks_dropout_masks(dropout_run, tmp_path):
    """Resume the step-3 save on 2 torchrun "nodes" x 1 process: steps 4-6 repeat the
    uninterrupted run's losses, dropout included (each rank gets its own RNG states back)."""
    out, ranks = dropout_run
    resumed = _launch(tmp_path, "lora_fsdp", "6", "--dropout", "0.1", "--resume",
                      str(out / "lora_fsdp" / "ckpt" / "step=3"), nodes=2)["lora_fsdp"]
    assert resumed[0]["world_size"] == 2
    torch.testing.assert_close(torch.tensor(_global_losses(resumed)), torch.tensor(_global_losses(ranks)[3:]),
                               rtol=1e-6, atol=1e-6)


def test_qlora_fsdp_shards_the_4bit_base_on_cpu_and_matches_one_process(tmp_path):
    quant = lp.QuantConfig(**QUANT)
    ranks = _launch(tmp_path, "qlora_fsdp", "4", "--ckpt-every", "4")["qlora_fsdp"]
    torch.testing.assert_close(torch.tensor(_global_losses(ranks)), torch.tensor(_one_process(4, quant)),
                               rtol=1e-5, atol=1e-5)
    for r in ranks:  # the packed 4-bit bytes (stored as float32) shard like any float tensor
        assert abs(r["held_bytes"] / r["base_bytes"] - 0.5) < 0.01, r
    _adapters_agree_across_ranks(tmp_path / "qlora_fsdp")
    _plain_model_reproduces(tmp_path / "qlora_fsdp" / "ckpt" / "last", ranks, quantize=True)


def test_ddp_and_fsdp_on_two_simulated_nodes_match_one_process(tmp_path):
    """2 torchrun "nodes" x 1 process, lora_ddp then lora_fsdp in the same processes."""
    runs = _launch(tmp_path, "lora_ddp,lora_fsdp", "3", nodes=2)
    reference = torch.tensor(_one_process(3))
    for name, ranks in runs.items():
        assert ranks[0]["world_size"] == 2 and ranks[0]["sharded"] == (name == "lora_fsdp")
        torch.testing.assert_close(torch.tensor(_global_losses(ranks)), reference, rtol=1e-5, atol=1e-5)
        _adapters_agree_across_ranks(tmp_path / name)


def test_fsdp1_arguments_are_refused_with_the_fsdp2_equivalent():
    with pytest.raises(TypeError, match="reshard_after_forward=False is FSDP2's SHARD_GRAD_OP"):
        lp.PEFTFSDPStrategy(sharding_strategy="SHARD_GRAD_OP")
