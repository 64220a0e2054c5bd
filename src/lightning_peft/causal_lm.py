r"""``CausalLMModule``: any transformers causal LM trained on chat / instruction batches.

The batches are those of :class:`~lightning_peft.data.ChatDataModule` (``input_ids``, ``labels``
with -100 where no loss is taken, and ``attention_mask`` or, packed, ``position_ids``). The model is
called with ``use_cache=False`` (packed rows need it, see :mod:`lightning_peft.data.batching`).

The loss is token-weighted over gradient accumulation: with micro-batches ``k = 1..A`` of one
optimizer step holding ``n_k`` label tokens and token losses summing to ``S_k``, the gradient is
that of

    L = (S_1 + ... + S_A) / (n_1 + ... + n_A)

(every label token counts the same), not of the mean of the micro-batch means ``(S_k / n_k)``,
which over-weights the tokens of short micro-batches. How: ``training_step`` returns ``S_k``
(Lightning divides it by ``A`` before ``backward``), the label tokens are counted, and
``on_before_optimizer_step`` (after the closure, before gradient clipping and the step) multiplies
the trainable gradients by ``A * W / N``: ``N`` is the window's label-token count summed over the
``W`` ranks (one all-reduce of a scalar), undoing both Lightning's ``1/A`` and the data-parallel
mean over ranks. The logged ``train_loss`` is the micro-batch's per-token mean; ``val_loss`` is
token-weighted over the whole validation set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from .recipe import recipe_optimizer

IGNORE_INDEX = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of the token cross-entropies, number of label tokens)`` of a causal LM: position ``t``
    predicts ``labels[t + 1]``; -100 is ignored. The sum is computed in float32."""
    shifted = labels[:, 1:]
    logits = logits[:, :-1]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shifted != IGNORE_INDEX).sum()


def load_causal_lm(base: str | os.PathLike, dtype: str | None = None, attn_implementation: str | None = None):
    """``AutoModelForCausalLM.from_pretrained(base, local_files_only=True)`` with a one-line error."""
    path = Path(base)
    if not path.is_dir():
        raise ValueError(f"CausalLMModule: base={str(base)!r} is not a directory. Give the directory of a transformers "
                         f"causal LM (saved with save_pretrained, or downloaded beforehand), or a model object.")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError("CausalLMModule loads transformers models: pip install transformers") from None
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"CausalLMModule(dtype={dtype!r}): choose one of {', '.join(DTYPES)} (or None: as saved).")
        kwargs["dtype"] = DTYPES[dtype]
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"CausalLMModule: could not load a causal LM from {path} ({str(err).splitlines()[0]}).") \
            from None


class CausalLMModule(L.LightningModule):
    """A transformers causal LM fine-tuned on ``{"input_ids", "labels", ...}`` batches.

    Args:
        base: a model directory (``AutoModelForCausalLM.from_pretrained``, local files only) or a
            model object (any ``nn.Module`` whose ``forward(input_ids=..., attention_mask=...,
            position_ids=..., use_cache=False)`` returns ``.logits``).
        lr / warmup_ratio / min_lr_ratio / weight_decay: :func:`lightning_peft.recipe_optimizer`'s
            (the recipe: 1e-4, 3% warm-up, cosine to 10%, no weight decay).
        tokenizer: the tokenizer (object or directory); default: the one saved in ``base`` if there
            is one. :class:`~lightning_peft.data.ChatDataModule` uses it when given none.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` to load ``base`` in; None: as saved.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``).

    Use it under a lightning-peft strategy (``Trainer(strategy="qlora")``): the adapters go into
    ``self.model``, and only they are trained.
    """

    def __init__(self, base: str | os.PathLike | nn.Module, lr: float = 1e-4, warmup_ratio: float = 0.03,
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.0, tokenizer: Any = None,
                 dtype: str | None = None, attn_implementation: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"] + ([] if isinstance(base, (str, os.PathLike)) else ["base"]))
        if isinstance(base, (str, os.PathLike)):
            self.model = load_causal_lm(base, dtype, attn_implementation).train()  # from_pretrained gives eval mode
            if tokenizer is None and any((Path(base) / f).is_file() for f in ("tokenizer.json",
                                                                               "tokenizer_config.json")):
                tokenizer = base
        elif isinstance(base, nn.Module):
            self.model = base
        else:
            raise TypeError(f"CausalLMModule(base=...): give a model directory or an nn.Module, got "
                            f"{type(base).__name__}.")
        if tokenizer is not None:
            from .data.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer, "CausalLMModule")
        self.tokenizer = tokenizer
        self._window_tokens = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        return self.model(input_ids=input_ids, use_cache=False,
                          **{k: v for k, v in kwargs.items() if v is not None}).logits

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            raise TypeError(f"CausalLMModule trains on dict batches with 'input_ids' and 'labels' (and "
                            f"'attention_mask' or 'position_ids'), e.g. from lightning_peft.data.ChatDataModule; "
                            f"got {type(batch).__name__}.")
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        return token_loss_sum(logits, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, tokens = self._loss(batch)
        self._window_tokens += int(tokens)
        n = int(tokens)
        self.log("train_loss", total.detach() / max(n, 1), prog_bar=True, batch_size=max(n, 1))
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trainer = self.trainer
        tokens = torch.tensor(float(self._window_tokens), device=self.device)
        if trainer.world_size > 1:
            tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
        self._window_tokens = 0
        factor = trainer.accumulate_grad_batches * trainer.world_size / max(float(tokens), 1.0)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, tokens = self._loss(batch)
        n = max(int(tokens), 1)
        self.log("val_loss", total / n, prog_bar=True, batch_size=n, sync_dist=True)  # weighted by tokens

    def configure_optimizers(self):
        hp = self.hparams
        return recipe_optimizer(self, lr=hp.lr, warmup_ratio=hp.warmup_ratio, min_lr_ratio=hp.min_lr_ratio,
                                weight_decay=hp.weight_decay)
