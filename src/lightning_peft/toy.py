"""A tiny causal LM and synthetic data for the example configs: the recipe end to end in seconds.

``lightning-peft fit --config examples/configs/toy.yaml`` names these two classes by import path
(``model.class_path``, ``data.class_path``); they live in the package so that the path resolves
from any working directory. Replace them with your own LightningModule and data: the strategy,
the callbacks and ``recipe_optimizer`` do not depend on them.

Needs ``transformers`` (the model is a Llama built from a config: no download).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from .recipe import recipe_optimizer


class TinyCausalLM(L.LightningModule):
    """A 2-layer Llama whose weights are a function of ``init_seed`` (it stands in for a pretrained
    checkpoint: ``lightning-peft merge --base lightning_peft.toy.TinyCausalLM`` rebuilds the same
    base), trained with :func:`lightning_peft.recipe_optimizer`.

    Args:
        hidden_size / num_layers / vocab_size: the Llama's size.
        init_seed: seed of the base weights (the global RNG is left as it was).
        lr / warmup_ratio / min_lr_ratio / weight_decay: passed to ``recipe_optimizer``.
    """

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 128, init_seed: int = 0,
                 lr: float = 1e-4, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.1,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            raise ImportError("lightning_peft.toy.TinyCausalLM builds a transformers Llama: pip install "
                              "transformers") from None
        config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = LlamaForCausalLM(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        return recipe_optimizer(self, lr=hp.lr, warmup_ratio=hp.warmup_ratio, min_lr_ratio=hp.min_lr_ratio,
                                weight_decay=hp.weight_decay)


class SyntheticTokens(L.LightningDataModule):
    """Token sequences a model can learn: arithmetic progressions ``(a + b t) mod vocab_size``
    with random start ``a`` and stride ``b`` in [1, 8).

    Args:
        num_sequences / val_sequences: training and validation set sizes.
        seq_len: tokens per sequence.
        vocab_size: must not exceed the model's.
        batch_size: the micro-batch; the effective batch is ``batch_size * accumulate_grad_batches``
            (times the number of devices).
        seed: seed of the data (validation uses ``seed + 1``).
    """

    def __init__(self, num_sequences: int = 512, val_sequences: int = 64, seq_len: int = 32, vocab_size: int = 128,
                 batch_size: int = 8, seed: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _sequences(self, n: int, seed: int) -> torch.Tensor:
        hp = self.hparams
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, hp.vocab_size, (n, 1), generator=generator)
        stride = torch.randint(1, 8, (n, 1), generator=generator)
        return (start + stride * torch.arange(hp.seq_len)) % hp.vocab_size

    def train_dataloader(self) -> DataLoader:
        data = self._sequences(self.hparams.num_sequences, self.hparams.seed)
        return DataLoader(list(data), batch_size=self.hparams.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(list(self._sequences(self.hparams.val_sequences, self.hparams.seed + 1)),
                          batch_size=self.hparams.batch_size)
