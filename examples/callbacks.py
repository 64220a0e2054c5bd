"""QLoRA with all three callbacks: adapter checkpoints, an 8-bit paged optimizer, a verified merge.

    python examples/callbacks.py                    # ~30 s on 2 CPU cores
    python examples/callbacks.py --steps 10 --out /tmp/run

The LightningModule below is plain Lightning + transformers: `strategy="qlora"` quantizes its model
to NF4 and injects LoRA adapters at setup. Afterwards `<out>/adapters/last` holds a PEFT-format
adapter plus the training state (`trainer.fit(..., ckpt_path=<out>/adapters/last)` resumes), and
`<out>/merged/model.safetensors` the merged model, checked against the adapted one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_peft  # noqa: F401  (registers strategy="qlora")
from lightning_peft.callbacks import AdapterCheckpoint, MergeAdapters, PagedOptimizer


class TinyLM(L.LightningModule):
    def __init__(self, vocab: int = 256, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)  # stands in for a pretrained checkpoint
        self.model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                                  initializer_range=0.1))

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        warmup = max(1, int(0.03 * total))  # the recipe: 3% warm-up, cosine decay
        schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))], [warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="lightning-peft-"))

    data = torch.randint(0, 256, (32, 24), generator=torch.Generator().manual_seed(1))
    train, val = DataLoader(list(data), batch_size=8), DataLoader(list(data[:8]), batch_size=8)
    checkpoints = AdapterCheckpoint(dirpath=out / "adapters", monitor="val_loss", every_n_train_steps=10)
    merge = MergeAdapters(output_dir=out / "merged", dtype=torch.bfloat16)
    trainer = L.Trainer(strategy="qlora", accelerator="cpu", max_steps=args.steps, val_check_interval=10,
                        check_val_every_n_epoch=None,
                        callbacks=[checkpoints, PagedOptimizer("paged_adamw_8bit"), merge],
                        logger=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(TinyLM(), train, val)
    print(f"best adapter: {checkpoints.best_adapter_path} (val_loss {checkpoints.best_model_score:.3f})")
    print(f"merged model: {merge.export_path} (relative error vs adapted model {merge.errors['rel']:.2e})")
    return {"out": out, "best": checkpoints.best_adapter_path, "merge_error": merge.errors["rel"],
            "optimizer": type(trainer.optimizers[0]).__name__}


if __name__ == "__main__":
    main()
