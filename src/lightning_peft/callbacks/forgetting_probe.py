r"""``ForgettingProbe``: catch silent capability loss while the adapters train.

Fine-tuning hard on a narrow task can make a model worse at everything else while the task's own
metrics keep improving (catastrophic forgetting). The probe scores the model on a *general* probe
set that the training never sees:

    base      L_0 = mean token loss on the probe set, adapters disabled (the base model exactly),
                    measured once at fit start
    adapted   L_t = the same, adapters on, after each validation
    regression  rho_t = (L_t - L_0) / L_0          perplexity  exp(L_t)

and logs ``forgetting/probe_loss``, ``forgetting/probe_perplexity`` and ``forgetting/regression``
through ``pl_module.log`` (so a logger, a progress bar or ``EarlyStopping`` can use them). Beyond
``max_regression`` it warns (once per new high), or stops the run with ``stop=True``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from ..inject import adapter_configs, adapter_owner, disable_adapters

LossFn = Callable[[pl.LightningModule, Any], torch.Tensor]


@contextmanager
def evaluating(module: nn.Module):
    """Eval mode for the block; afterwards every submodule gets its own train/eval flag back (a
    frozen submodule kept in eval mode during training stays so)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def perplexity(loss: float) -> float:
    """``exp(loss)``; inf instead of an OverflowError for absurd losses (a guard must not crash)."""
    return math.exp(loss) if loss < 700 else math.inf


def causal_lm_token_losses(pl_module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """Next-token cross-entropy of every predicted token, ``[n_tokens]`` fp32.

    The model called is the one the adapters were injected into (the transformers model inside the
    LightningModule), as ``model(input_ids=..., attention_mask=...)``; its ``.logits`` (or its
    output, if a tensor) ``[B, T, V]`` predict the labels shifted by one. ``batch`` is either a
    LongTensor of token ids ``[B, T]`` (labels = the ids) or a dict with ``input_ids`` and optionally
    ``attention_mask`` (masked positions are not scored) and ``labels`` (``-100`` = not scored).
    Under prompt tuning the logits are longer, ``[B, P + T, V]`` (the ``P`` virtual tokens come
    first): the last ``T`` positions are scored, so that the same tokens are scored as for the base.
    """
    if isinstance(batch, torch.Tensor):
        input_ids, labels, kwargs = batch, batch, {}
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = batch.get("labels", input_ids if mask is None else input_ids.masked_fill(mask == 0, -100))
        kwargs = {} if mask is None else {"attention_mask": mask}
    else:
        raise TypeError(f"ForgettingProbe: a probe batch must be a tensor of token ids [batch, seq] or a dict with "
                        f"'input_ids' (and optionally 'attention_mask', 'labels'), not {type(batch).__name__}; "
                        f"or pass loss_fn=... to score your own batches.")
    model = adapter_owner(pl_module) or pl_module
    out = model(input_ids=input_ids, **kwargs)
    logits = getattr(out, "logits", out)[:, -input_ids.shape[1]:]  # drop prompt tuning's virtual positions
    targets = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                             ignore_index=-100, reduction="none")
    return losses[targets != -100]


class ForgettingProbe(Callback):
    """Score a general probe set with the adapters off (once) and on (after each validation).

    Args:
        dataloader: the probe set, any iterable of batches (e.g. a ``DataLoader``). Every rank
            evaluates all of it each time: keep it small (a few hundred sequences of general text).
        max_regression: the largest tolerated relative loss increase ``(L - L_0) / L_0``.
        stop: stop the run (``trainer.should_stop``) when the regression exceeds ``max_regression``;
            otherwise warn.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor``: per-token losses (averaged over all tokens
            of the probe set) or one mean loss per batch (averaged over batches). Default:
            :func:`causal_lm_token_losses`.
        task_metric: the logged validation metric of the task itself, recorded beside each probe
            measurement (``task`` in ``history``) for the general-vs-task curve (:meth:`figure`).
        tokenizer / batch_size / max_length: for a ``dataloader`` given as the path of a JSONL file
            (what a YAML config can give): its records (``{"text": ...}`` scores every token,
            ``{"messages": [...]}`` the assistant replies) are tokenized with ``tokenizer`` (an
            object or a saved directory; default the LightningModule's ``tokenizer``), cut at
            ``max_length`` tokens (chat: longer ones dropped) and batched by ``batch_size``.

    The probe runs after each validation and, when an epoch ends without one, at the epoch end;
    in eval mode, without gradients, under the precision plugin's forward context, with batches
    moved to the module's device. ``base_loss`` holds ``L_0``; ``history`` a dict per measurement
    (``step``, ``epoch``, ``loss``, ``perplexity``, ``regression``, and ``task``: the value of
    ``task_metric`` at that validation, or None).
    """

    def __init__(self, dataloader: Iterable | str | os.PathLike, max_regression: float = 0.05, stop: bool = False,
                 loss_fn: LossFn | None = None, task_metric: str | None = "val_loss", tokenizer: Any = None,
                 batch_size: int = 8, max_length: int = 1024) -> None:
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length
        if isinstance(dataloader, (str, os.PathLike)) and (Path(dataloader).suffix in (".jsonl", ".json")
                                                          or Path(dataloader).is_file()):
            if not Path(dataloader).is_file():  # a JSONL file (YAML configs): built at fit start
                raise ValueError(f"ForgettingProbe(dataloader={str(dataloader)!r}): no such file. Give a JSONL file "
                                 f"of probe records ({{'text': ...}}, or chat {{'messages': [...]}}), or a DataLoader.")
        elif isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable):
            raise TypeError(f"ForgettingProbe(dataloader=...) needs an iterable of probe batches (a DataLoader of "
                            f"token-id tensors or dicts with 'input_ids') or the path of a JSONL file of probe "
                            f"records, not {type(dataloader).__name__} {str(dataloader)[:80]!r}.")
        if isinstance(max_regression, bool) or not isinstance(max_regression, (int, float)) or not max_regression >= 0:
            raise ValueError(f"ForgettingProbe(max_regression={max_regression!r}): give a relative loss increase "
                             f">= 0, e.g. 0.05 for 5% above the base model's probe loss.")
        if not isinstance(stop, bool):
            raise TypeError(f"ForgettingProbe(stop={stop!r}): True (stop the run) or False (warn).")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("ForgettingProbe(loss_fn=...) must be callable as loss_fn(pl_module, batch).")
        self.dataloader = dataloader
        self.max_regression = float(max_regression)
        self.stop = stop
        self.loss_fn = loss_fn or causal_lm_token_losses
        self.task_metric = task_metric
        self.base_loss: float | None = None
        self.history: list[dict[str, float]] = []
        self._worst_warned = -math.inf
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.dataloader, (str, os.PathLike)):
            self.dataloader = self._load(self.dataloader, pl_module)
        self._score_base(trainer, pl_module)

    def _load(self, path: str | os.PathLike, pl_module: pl.LightningModule):
        from torch.utils.data import DataLoader

        from ..data import ChatCollator, load_tokenizer, read_records, tokenize_example
        tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"ForgettingProbe: the probe set {path} is a file of records and no tokenizer was given; "
                             f"pass tokenizer=... (an object or a saved directory), or train a LightningModule with "
                             f".tokenizer (lightning_peft.CausalLMModule).")
        tokenizer = load_tokenizer(tokenizer, "ForgettingProbe")
        examples = [e for r in read_records(path, "probe set")
                    if (e := tokenize_example(r, tokenizer, self.max_length)) is not None]
        if not examples:
            raise ValueError(f"ForgettingProbe: no probe example of {path} fits in max_length={self.max_length}.")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return DataLoader(examples, batch_size=self.batch_size, collate_fn=ChatCollator(pad or 0))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:  # not in trainer.validate()
            self._check(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the epoch's validation metrics reach callback_metrics after on_validation_epoch_end
        value = trainer.callback_metrics.get(self.task_metric) if self.task_metric else None
        if value is not None and self.history and self.history[-1]["step"] == trainer.global_step:
            self.history[-1]["task"] = float(value)

    def figure(self):
        """General probe loss vs the task's validation loss over training (a matplotlib figure;
        :func:`lightning_peft.plots.save_figure` writes it)."""
        from ..plots import forgetting_figure

        return forgetting_figure(self.history, self.base_loss, self.task_metric or "task")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step != trainer.global_step:  # no validation ran at this step
            self._check(trainer, pl_module)

    # base_loss is not restored: every fit start measures it again (whether Lightning restores callback
    # state before or after on_fit_start depends on the strategy)
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "worst_warned": self._worst_warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self._worst_warned = state_dict["worst_warned"]

    # ----------------------------------------------------------------------------------- worker
    def _score_base(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not adapter_configs(pl_module):  # strategies inject in their setup, before on_fit_start
            raise RuntimeError("ForgettingProbe found no adapters in the LightningModule; use a lightning-peft "
                               "strategy (e.g. strategy='lora') or call lightning_peft.inject_adapters on its model.")
        with disable_adapters(pl_module):
            self.base_loss = self._probe_loss(trainer, pl_module)
        if not self.base_loss > 0:  # the regression is relative to it
            raise RuntimeError(f"ForgettingProbe: the base model's probe loss is {self.base_loss}; a relative "
                               f"regression needs a positive loss. Check the probe set and loss_fn.")

    def _probe_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        # every rank scores the whole probe set: no cross-rank sync needed (or wanted) in compute()
        mean = MeanMetric(nan_strategy="disable", sync_on_compute=False).to(pl_module.device)
        with evaluating(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in self.dataloader:
                mean.update(self.loss_fn(pl_module, move_data_to_device(batch, pl_module.device)).float())
        return mean.compute().item()

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = self._probe_loss(trainer, pl_module)
        regression = (loss - self.base_loss) / self.base_loss
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "loss": loss,
                  "perplexity": perplexity(loss), "regression": regression, "task": None}
        self.history.append(record)
        self._last_step = trainer.global_step
        pl_module.log_dict({"forgetting/probe_loss": loss, "forgetting/probe_perplexity": record["perplexity"],
                            "forgetting/regression": regression}, on_step=False, on_epoch=True)
        exceeded = regression > self.max_regression
        if exceeded and regression > self._worst_warned:  # once per new high
            self._worst_warned = regression
            rank_zero_warn(self._message(record))
        if self.stop and trainer.strategy.reduce_boolean_decision(exceeded, all=False):
            trainer.should_stop = True

    def _message(self, record: dict[str, float]) -> str:
        base = self.base_loss
        action = ("Stopping the run (stop=True)." if self.stop else
                  "Training continues; pass stop=True to stop runs at this point.")
        return (f"ForgettingProbe: at epoch {record['epoch']}, step {record['step']} the adapted model's loss on the "
                f"probe set is {record['regression']:.1%} above the base model's ({record['loss']:.4f} vs {base:.4f}; "
                f"perplexity {record['perplexity']:.2f} vs {perplexity(base):.2f}), beyond "
                f"max_regression={self.max_regression:g}. This is silent capability loss (catastrophic forgetting), "
                f"one of the four classic fine-tuning failures: the task improves while what the model could "
                f"already do degrades, and the task's own metrics do not show it. Lower the learning rate, train "
                f"fewer epochs or steps, use a smaller LoRA rank, or mix general data into the training set. {action}")
