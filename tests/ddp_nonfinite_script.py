"""Run by tests/test_nonfinite.py: 2-process lora_ddp on CPU (gloo); only rank 1's loss turns NaN
at global step 2. Both ranks must stop at that step (the decision is all-reduced), neither hangs.
Each rank writes what it saw to ``rank{r}.txt``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.strategy import NonFiniteTrainingError


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        if self.global_step == 2 and self.global_rank == 1:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(out: Path) -> None:
    rank = int(os.environ.get("LOCAL_RANK", 0))
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)), batch_size=2)
    trainer = L.Trainer(strategy="lora_ddp", accelerator="cpu", devices=2, max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = Tiny()
    try:
        trainer.fit(module, data)
        result = "finished"
    except NonFiniteTrainingError as err:
        result = f"raised at {trainer.global_step}: {err}"
    finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    (out / f"rank{rank}.txt").write_text(f"{result}\nfinite={finite}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
