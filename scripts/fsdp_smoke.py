"""FSDP-QLoRA smoke run on CUDA (called by scripts/gpu_check.sh): a few steps of
Trainer(strategy="qlora_fsdp") on every visible GPU; the loss must fall and the checkpoint must
hold adapter tensors only. Prints one line: FSDP_SMOKE OK ... or raises."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import lightning_peft  # noqa: E402,F401  (registers the strategy names)
from lightning_peft.quantize import is_quantized  # noqa: E402
from plain_module import CausalLM, sequences  # noqa: E402


def main(out: Path) -> None:
    L.seed_everything(0)
    module = CausalLM(hidden=256, layers=4, vocab=1000, lr=5e-3)
    trainer = L.Trainer(strategy="qlora_fsdp", accelerator="cuda", devices=torch.cuda.device_count(),
                        precision="bf16-true", max_steps=20, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(module, sequences(n=8, vocab=1000))  # one batch, seen 20 times
    path = out / "fsdp.ckpt"
    trainer.save_checkpoint(path)
    if trainer.is_global_zero:
        keys = torch.load(path, weights_only=False)["state_dict"].keys()
        assert keys and all(".lora_" in k for k in keys), sorted(keys)[:5]
        assert any(is_quantized(m) for m in module.modules())
        assert module.losses[-1] < 0.8 * module.losses[0], (module.losses[0], module.losses[-1])
        print(f"FSDP_SMOKE OK loss {module.losses[0]:.3f} -> {module.losses[-1]:.3f}, {len(keys)} adapter tensors, "
              f"ckpt {path.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
