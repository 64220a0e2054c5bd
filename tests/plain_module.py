"""A LightningModule that knows nothing of lightning_peft: the strategy does all the PEFT work."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM


class CausalLM(L.LightningModule):
    def __init__(self, hidden: int = 64, layers: int = 2, vocab: int = 128, lr: float = 1e-2, seed: int = 0,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        # initializer_range 0.1: logits with a trained model's range (0.02 caps them near 1)
        self.model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                  num_hidden_layers=layers, num_attention_heads=4,
                                                  num_key_value_heads=2, vocab_size=vocab, initializer_range=0.1))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.losses: list[float] = []

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def sequences(n: int = 80, seq: int = 16, vocab: int = 128, batch: int = 8) -> DataLoader:
    data = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))
    return DataLoader(list(data), batch_size=batch, shuffle=False)
