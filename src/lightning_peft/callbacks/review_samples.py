"""``ReviewSamples``: the model's answers to fixed prompts, adapters on and off, beside each checkpoint.

Loss curves do not show a model that learned the format but not the content, repeats itself, or
lost abilities it had; the fine-tuning recipe says to read ~50 outputs per checkpoint yourself. This
callback prepares the reading: after each evaluation (every ``every_n_epochs`` epochs) it generates
a greedy continuation of every prompt with the adapters on and with them off (the base model) and
writes them side by side to ``review-epoch=E-step=S.md`` in the checkpoint folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from ..atomic import atomic_write
from ..inject import adapter_configs, adapter_owner, disable_adapters
from .forgetting_probe import evaluating

Prompt = str | list[int]


class ReviewSamples(Callback):
    """Write greedy generations for ``prompts``, adapters on and off, to a Markdown file per evaluation.

    Args:
        prompts: strings (encoded with ``tokenizer``) or sequences of token ids.
        every_n_epochs: review in epochs ``n - 1, 2n - 1, ...``: after each validation of those
            epochs and, when such an epoch ends without a validation, at its end.
        max_new_tokens: the length of each generation (``model.generate(..., do_sample=False)``).
        tokenizer: anything with ``encode(text) -> list[int]`` and ``decode(ids, skip_special_tokens=True)``
            (a transformers tokenizer), or the directory one was saved to. Needed for string prompts;
            without it the file shows token ids.
        dirpath: where the files go. Default: the checkpoint callback's ``dirpath``, else
            ``trainer.default_root_dir``.

    The model generating is the one the adapters were injected into (the transformers model inside
    the LightningModule); it needs a ``generate`` method. Every rank generates (a sharded model needs
    all ranks in each forward); global rank 0 writes, atomically (temporary file, then rename).
    ``files`` lists the files written.
    """

    def __init__(self, prompts: Sequence[Prompt], every_n_epochs: int = 1, max_new_tokens: int = 32,
                 tokenizer: Any = None, dirpath: str | Path | None = None) -> None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("ReviewSamples(prompts=...) needs a non-empty list of prompts (strings, or lists of "
                             "token ids).")
        self.prompts = [p if isinstance(p, str) else _token_ids(p) for p in prompts]
        if tokenizer is not None:
            from ..data.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer, "ReviewSamples")  # a saved directory (YAML configs) or an object
        if tokenizer is None and any(isinstance(p, str) for p in self.prompts):
            raise ValueError("ReviewSamples: string prompts need a tokenizer (tokenizer=AutoTokenizer."
                             "from_pretrained(...)); or give the prompts as lists of token ids.")
        for name, value in (("every_n_epochs", every_n_epochs), ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReviewSamples({name}={value!r}): give an integer >= 1.")
        self.every_n_epochs = every_n_epochs
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.files: list[Path] = []
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_model(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self._due(trainer):
            self._review(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step != trainer.global_step and self._due(trainer):  # no review at this step yet
            self._review(trainer, pl_module)

    # ----------------------------------------------------------------------------------- worker
    def _due(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        if not adapter_configs(pl_module):
            raise RuntimeError("ReviewSamples found no adapters in the LightningModule; use a lightning-peft "
                               "strategy (e.g. strategy='lora') or call lightning_peft.inject_adapters on its model.")
        model = adapter_owner(pl_module)
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"ReviewSamples generates with model.generate (a transformers model), but the model the "
                            f"adapters live in, {type(model).__name__}, has no generate method.")

    def _review(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = adapter_owner(pl_module)
        samples = []
        with evaluating(model), torch.no_grad(), trainer.precision_plugin.forward_context():
            for prompt in self.prompts:
                ids = torch.tensor([self._encode(prompt)], device=pl_module.device)
                adapted = self._generate(model, ids)
                with disable_adapters(model):
                    base = self._generate(model, ids)
                samples.append((self._show(prompt), self._decode(adapted), self._decode(base)))
        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            directory = self.dirpath or Path(getattr(trainer.checkpoint_callback, "dirpath", None)
                                             or trainer.default_root_dir)
            path = directory / f"review-epoch={trainer.current_epoch}-step={trainer.global_step}.md"
            directory.mkdir(parents=True, exist_ok=True)
            text = self._markdown(trainer, samples)
            atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            self.files.append(path)

    def _generate(self, model, ids: torch.Tensor) -> list[int]:
        """The greedy continuation of ``ids: [1, T]`` (new tokens only)."""
        config = getattr(model, "generation_config", None)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None and config is not None:
            pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        return out[0, ids.shape[1]:].tolist()

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt

    def _decode(self, ids: list[int]) -> str:
        return str(ids) if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def _show(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else self._decode(prompt)

    def _markdown(self, trainer: pl.Trainer, samples: list[tuple[str, str, str]]) -> str:
        lines = [f"# Samples at epoch {trainer.current_epoch}, step {trainer.global_step}", "",
                 f"Greedy continuations (`max_new_tokens={self.max_new_tokens}`) of {len(samples)} prompts, with "
                 f"the adapters on and off (the base model). Read them: format right but content wrong, "
                 f"repetition, lost abilities and refusals do not show in the loss.", ""]
        for index, (prompt, adapted, base) in enumerate(samples, 1):
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", prompt)), default=0))
            lines += [f"## Prompt {index}", "", fence, prompt, fence, "",
                      "| adapters on | adapters off (base model) |", "|---|---|",
                      f"| {_cell(adapted)} | {_cell(base)} |", ""]
        return "\n".join(lines)


def _token_ids(prompt: Any) -> list[int]:
    ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
    if not isinstance(ids, Sequence) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"ReviewSamples: a prompt must be a string or a non-empty list of token ids, not {prompt!r}.")
    return list(ids)


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: pipes escaped, line breaks as ``<br>``, empty shown."""
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")  # Markdown's line endings
    return text if text.strip() else "*(empty)*"
