"""``DPOModule`` and ``GRPOModule``: LightningModules around any causal LM.

The model is a transformers-style causal LM (``model(input_ids=..., attention_mask=...)`` returns
logits or an output with ``.logits``; GRPO also needs ``model.generate``). Adapters come from the
strategy (``Trainer(strategy="qlora")`` injects them into ``module.model``) or from
``lightning_peft.inject_adapters``; the reference policy is the same model with its adapters off,
or a frozen named adapter (``reference_adapter``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import lightning as L
import torch
from torch import nn

from ..methods.base import DROPOUT_TYPES
from ..multi import clear_adapter_caches
from .dpo import DPO_LOSS_TYPES, dpo_loss
from .grpo import GRPO_LOSS_TYPES, grpo_loss
from .logprobs import reference_logprobs, sequence_logprobs


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
    return ids, attention


def disable_dropout(model: nn.Module) -> int:
    """Set ``p=0`` on every dropout module of ``model`` (torch's and the adapters'); returns how many
    had ``p > 0``. Dropout in the policy's forward but not in the sampling or reference one makes
    the log-probability ratios noisy; like TRL's preference trainers, the modules here turn it off by
    default (``disable_dropout=True``). Dropout a model applies functionally (a config float such
    as Llama's ``attention_dropout``, 0 by default) is not a module and is left as configured."""
    changed = 0
    for module in model.modules():
        if isinstance(module, DROPOUT_TYPES) and module.p > 0:
            module.p = 0.0
            changed += 1
    clear_adapter_caches(model)  # mixed-batch stacks keep each adapter's dropout rate
    return changed


class _DropoutOff(L.LightningModule):
    def on_fit_start(self) -> None:
        # after the strategy's setup, so the adapters it injected are covered too
        if self.hparams.disable_dropout:
            disable_dropout(self.model)


class PreferenceCollator:
    """Collate ``{"prompt": ids, "chosen": ids, "rejected": ids}`` examples (lists of token ids)
    into one right-padded batch of ``2 B`` rows, chosen first: ``input_ids``, ``attention_mask`` and
    ``labels_mask`` (1 on completion tokens only)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows, spans = [], []
        for key in ("chosen", "rejected"):
            for ex in examples:
                rows.append(list(ex["prompt"]) + list(ex[key]))
                spans.append((len(ex["prompt"]), len(ex["prompt"]) + len(ex[key])))
        ids, attention = _pad(rows, self.pad_token_id)
        labels_mask = torch.zeros_like(ids)
        for i, (start, end) in enumerate(spans):
            labels_mask[i, start:end] = 1
        return {"input_ids": ids, "attention_mask": attention, "labels_mask": labels_mask}


class DPOModule(_DropoutOff):
    """DPO (or IPO) on a causal LM. Batches come from :class:`PreferenceCollator`.

    Logs ``{stage}_loss`` and ``{stage}/rewards_chosen``, ``rewards_rejected``, ``margin``,
    ``accuracy`` (stage: ``train`` or ``val``; in training per step, plus the epoch means
    ``train/margin_epoch`` and ``train/accuracy_epoch``). With ``disable_dropout`` (default) every dropout
    module of the model gets ``p=0`` at fit start (:func:`disable_dropout`)."""

    def __init__(self, model: nn.Module, beta: float = 0.1, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid", lr: float = 5e-5, reference_adapter: str | None = None,
                 disable_dropout: bool = True) -> None:
        super().__init__()
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r}: choose one of {list(DPO_LOSS_TYPES)}.")
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        args = (batch["input_ids"], batch["attention_mask"], batch["labels_mask"])
        policy = sequence_logprobs(self.model, *args).sum
        reference = reference_logprobs(self.model, *args, reference_adapter=self.hparams.reference_adapter).sum
        half = policy.shape[0] // 2
        out = dpo_loss(policy[:half], policy[half:], reference[:half], reference[half:], beta=self.hparams.beta,
                       label_smoothing=self.hparams.label_smoothing, loss_type=self.hparams.loss_type)
        self.log(f"{stage}_loss", out.loss, prog_bar=True, batch_size=half)
        self.log_dict({f"{stage}/rewards_chosen": out.chosen_rewards.mean(),
                       f"{stage}/rewards_rejected": out.rejected_rewards.mean(),
                       f"{stage}/margin": out.margin, f"{stage}/accuracy": out.accuracy}, batch_size=half)
        if stage == "train":  # per step above (noisy: one batch); the epoch mean too, weighted by pairs
            self.log_dict({"train/margin_epoch": out.margin, "train/accuracy_epoch": out.accuracy},
                          on_step=False, on_epoch=True, batch_size=half)
        return out.loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class GRPOModule(_DropoutOff):
    """GRPO on a causal LM with a user reward function.

    Each batch is a ``[G, P]`` tensor of prompts (equal length; token ids). For each prompt the
    current policy samples ``group_size`` completions of ``max_new_tokens`` tokens;
    ``reward_fn(prompts [G k, P], completions [G k, C]) -> rewards [G k]`` scores them; one policy
    update follows (so the sampling policy's log-probabilities are the detached current ones).
    Logs ``train_loss``, ``train/reward``, ``train/kl``, ``train/clip_fraction``. With
    ``disable_dropout`` (default) every dropout module of the model gets ``p=0`` at fit start
    (:func:`disable_dropout`): completions are sampled without dropout, so their log-probabilities
    are computed without it too."""

    def __init__(self, model: nn.Module, reward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 group_size: int = 8, max_new_tokens: int = 16, temperature: float = 1.0, epsilon: float = 0.2,
                 beta: float = 0.0, loss_type: str = "grpo", lr: float = 1e-5,
                 reference_adapter: str | None = None, pad_token_id: int = 0, disable_dropout: bool = True) -> None:
        super().__init__()
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r}: choose one of {list(GRPO_LOSS_TYPES)}.")
        if group_size < 2:
            raise ValueError(f"group_size={group_size}: GRPO compares completions within a group; use >= 2.")
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"{type(model).__name__} has no generate(); GRPOModule samples completions with it "
                            f"(a transformers causal LM has one).")
        self.save_hyperparameters(ignore=["model", "reward_fn"])
        self.model = model
        self.reward_fn = reward_fn

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor) -> torch.Tensor:
        """``[G k, P + C]``: ``group_size`` sampled continuations of each prompt (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        try:
            repeated = prompts.repeat_interleave(self.hparams.group_size, dim=0)
            return self.model.generate(input_ids=repeated, attention_mask=torch.ones_like(repeated),
                                       do_sample=True, temperature=self.hparams.temperature, top_k=0,
                                       max_new_tokens=self.hparams.max_new_tokens,
                                       min_new_tokens=self.hparams.max_new_tokens,
                                       pad_token_id=self.hparams.pad_token_id)
        finally:
            self.model.train(was_training)

    def training_step(self, prompts: torch.Tensor, batch_idx: int) -> torch.Tensor:
        sequences = self.sample(prompts)
        prompt_len = prompts.shape[1]
        labels_mask = torch.zeros_like(sequences)
        labels_mask[:, prompt_len:] = 1
        rewards = torch.as_tensor(self.reward_fn(sequences[:, :prompt_len], sequences[:, prompt_len:]),
                                  dtype=torch.float32, device=sequences.device)
        policy = sequence_logprobs(self.model, sequences, None, labels_mask)
        reference = None
        if self.hparams.beta > 0:
            reference = reference_logprobs(self.model, sequences, None, labels_mask,
                                           reference_adapter=self.hparams.reference_adapter).tokens
        out = grpo_loss(policy.tokens, policy.tokens.detach(), reference, rewards, self.hparams.group_size,
                        mask=policy.mask, epsilon=self.hparams.epsilon, beta=self.hparams.beta,
                        loss_type=self.hparams.loss_type)
        batch = prompts.shape[0]
        self.log("train_loss", out.loss, prog_bar=True, batch_size=batch)
        self.log_dict({"train/reward": rewards.mean(), "train/kl": out.kl, "train/clip_fraction": out.clip_fraction},
                      prog_bar=False, batch_size=batch)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
