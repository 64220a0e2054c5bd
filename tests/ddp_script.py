"""Run by tests/test_ddp.py: 2-process qlora_ddp on CPU (gloo). Lightning's popen launcher runs
this file once more for rank 1. Each rank dumps its adapters and dequantized base weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import lightning_peft  # noqa: E402,F401  (registers the strategy names)
from lightning_peft.quantize import dequantize_weight, is_quantized  # noqa: E402
from plain_module import CausalLM, sequences  # noqa: E402


def main(out: Path) -> None:
    rank = int(os.environ.get("LOCAL_RANK", 0))
    module = CausalLM(seed=100 + rank)  # ranks start from different float weights on purpose
    trainer = L.Trainer(strategy="qlora_ddp", accelerator="cpu", devices=2, max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, sequences(n=32))
    trainer.save_checkpoint(out / f"written_by_rank{rank}.ckpt")  # the strategy writes on rank 0 only
    tensors = {f"adapter.{k}": v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    tensors.update({f"base.{p}": dequantize_weight(m).float().clone()
                    for p, m in module.named_modules() if is_quantized(m)})
    save_file(tensors, str(out / f"dump_rank{rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
