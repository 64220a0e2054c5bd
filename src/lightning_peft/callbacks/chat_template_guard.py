"""``ChatTemplateGuard``: check that the first training batches are chat-template renders with the
right loss mask, before a run spends hours learning the wrong thing.

Expected batch: a dict (or ``BatchEncoding``) with ``input_ids`` and ``labels``, ``[batch, seq]``
integer tensors, and optionally ``attention_mask`` (0 = padding, ignored). ``labels`` follows the
transformers convention: a copy of ``input_ids`` (the model shifts it by one itself) with -100 where
no loss is taken.

What it learns from the tokenizer's own template, by rendering a probe conversation
(``apply_chat_template``, then tokenizing with ``add_special_tokens=False``) whose contents are
sentinels: words taken from the tokenizer's own vocabulary (never ``<unk>``, whatever language or
vocabulary the tokenizer has), distinct for each role, so that everything else in the render is the
template's::

    render([user])                              = prefix + user turn
    render([user], add_generation_prompt=True)  = prefix + user turn + header       ("<|im_start|>assistant\\n")
    render([user, assistant])                   = ... + header + reply + end + rest  (end "<|im_end|>", rest "\\n")
    render([user, assistant, user])             = ... + user turn              -> prefix, hence BOS ("<s>")
    render([system, user, assistant])           -> the system turn's markers, if the template takes one

``end`` is the first special token after the reply: the end-of-turn token the model must learn to
emit (the EOS of chat models). Then, in every sample:

1. the assistant header occurs (else the sample was not rendered with this template);
2. no special token that the template never writes (another model's template, hand-made markup);
3. it starts with the template's BOS, once (a tokenizer that adds BOS to a rendered text doubles it);
4. every assistant reply is closed by ``end`` before the next special token (else truncated);
5. ``labels`` equals ``input_ids`` wherever it is not -100 (else shifted or corrupted);
6. something is trained, and a reply that is trained has its ``end`` trained too: the pad == eos
   trap (a collator masking the pad id also masks every EOS, and the model never learns to stop);
7. nothing outside the replies is trained: the prompt (system/user turns, role headers) is -100.
   A reply spans its content, ``end`` and the template's ``rest`` after it.

Templates whose generation prompt is empty (Llama-2/Mistral ``[INST] ... [/INST] reply</s>``) give
replies no opening marker; they are refused at construction. Checked on templates in the styles of
ChatML, Llama-3, Gemma and Zephyr (built locally).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from jinja2 import TemplateError
from lightning.pytorch.callbacks import Callback

IGNORE_INDEX = -100
_SHOW = 600  # characters of a decoded sample quoted in an error


@dataclass(frozen=True)
class ChatTemplate:
    """What a tokenizer's chat template writes around the messages, as token ids."""

    bos: tuple[int, ...]      # special tokens before the first turn (e.g. <s>); may be empty
    header: tuple[int, ...]   # opens an assistant reply ("<|im_start|>assistant\n")
    end: int                  # closes it ("<|im_end|>")
    rest: tuple[int, ...]     # what the template writes after ``end`` in an assistant turn ("\n")
    specials: frozenset[int]  # every special token the template writes
    example: str              # the probe conversation, rendered

    @classmethod
    def learn(cls, tokenizer) -> ChatTemplate:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"ChatTemplateGuard: {type(tokenizer).__name__} has no chat_template; give the "
                             f"tokenizer of the chat model you fine-tune (or set tokenizer.chat_template).")
        words = _sentinels(tokenizer, 3)
        _PROBE_SYSTEM = {"role": "system", "content": words[2]}
        _PROBE_USER = {"role": "user", "content": words[0]}
        _PROBE_REPLY = {"role": "assistant", "content": words[1]}

        def render(messages, generation=False):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            return text, tokenizer(text, add_special_tokens=False)["input_ids"]

        _, one = render([_PROBE_USER])
        _, prompt = render([_PROBE_USER], generation=True)
        example, full = render([_PROBE_USER, _PROBE_REPLY])
        _, two = render([_PROBE_USER, _PROBE_REPLY, _PROBE_USER])
        special = set(tokenizer.all_special_ids)
        reply = full[len(prompt):]
        end_at = next((k for k, t in enumerate(reply) if t in special), None)
        user_turn = two[len(full):]
        if len(prompt) == len(one):
            raise ValueError(f"ChatTemplateGuard: this chat template's generation prompt is empty, so assistant "
                             f"replies have no opening marker to find (templates in the Llama-2/Mistral '[INST]' "
                             f"style are not supported). The probe renders as {example!r}.")
        if (prompt[:len(one)] != one or full[:len(prompt)] != prompt or end_at is None
                or two[:len(full)] != full or one[len(one) - len(user_turn):] != user_turn):
            raise ValueError(f"ChatTemplateGuard: cannot learn where assistant replies start and end from this "
                             f"chat template (it needs a special token that closes a reply, and renders of longer "
                             f"conversations that extend those of shorter ones). The probe renders as "
                             f"{example!r}.")
        try:  # a system turn may bring its own markers; some templates refuse system messages
            _, system = render([_PROBE_SYSTEM, _PROBE_USER, _PROBE_REPLY])
        except TemplateError:
            system = []
        prefix = one[:len(one) - len(user_turn)]
        bos = []
        for token in prefix:  # the special tokens leading the prefix; a default system prompt may follow
            if token not in special:
                break
            bos.append(token)
        return cls(bos=tuple(bos), header=tuple(prompt[len(one):]), end=reply[end_at], rest=tuple(reply[end_at + 1:]),
                   specials=frozenset(special & set(two + system)), example=example)


_ROLE_NAMES = {"system", "user", "assistant", "tool", "model", "human", "gpt", "bot"}  # templates write these


def _sentinels(tokenizer, k: int) -> list[str]:
    """``k`` distinct words of the tokenizer's own vocabulary (the last ids first: rare words, not
    template pieces) that tokenize to ordinary tokens: no special token, no ``<unk>``."""
    special = set(tokenizer.all_special_ids)
    found: list[str] = []
    vocab = tokenizer.get_vocab()
    for token_id in sorted(vocab.values(), reverse=True):
        if token_id in special:
            continue
        word = tokenizer.decode([token_id]).strip()
        if not word.isalnum() or word in found or word.lower() in _ROLE_NAMES:
            continue
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if ids and not special & set(ids):
            found.append(word)
            if len(found) == k:
                return found
    raise ValueError(f"ChatTemplateGuard: cannot find {k} words in the tokenizer's vocabulary that tokenize without "
                     f"special or unknown tokens, so there is nothing to render a probe conversation with (the "
                     f"vocabulary holds {len(vocab)} tokens, {len(special)} of them special).")


class ChatTemplateGuard(Callback):
    """Check the first ``check_batches`` training batches of each fit against ``tokenizer``'s chat
    template and the loss mask; raise ``ValueError`` with the offending sample decoded and the fix.

    Args:
        tokenizer: the transformers tokenizer of the model being fine-tuned, with a ``chat_template``,
            or the directory it was saved to (``save_pretrained``; what a YAML config can give).
            None: the LightningModule's ``tokenizer`` attribute at the start of the fit
            (:class:`~lightning_peft.CausalLMModule` has one).
        check_batches: how many batches to check at the start of each fit (the checks take
            milliseconds, but they are a start-of-run sanity check, not a per-step one).

    Batches: see the module docstring (``input_ids``, ``labels``, optional ``attention_mask``).
    :meth:`check_batch` runs the same checks without a Trainer.
    """

    def __init__(self, tokenizer=None, check_batches: int = 2) -> None:
        if isinstance(check_batches, bool) or not isinstance(check_batches, int) or check_batches < 1:
            raise ValueError(f"ChatTemplateGuard(check_batches={check_batches!r}): give the number of training "
                             f"batches to check, an int >= 1.")
        self.check_batches = check_batches
        self.tokenizer = self.template = None
        if tokenizer is not None:
            self._learn(tokenizer)
        self._checked = 0

    def _learn(self, tokenizer) -> None:
        from ..data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer, "ChatTemplateGuard")
        self.template = ChatTemplate.learn(tokenizer)
        self.tokenizer = tokenizer
        self._special_ids = frozenset(tokenizer.all_special_ids)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checked = 0
        if self.tokenizer is None:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(f"ChatTemplateGuard: no tokenizer. Give ChatTemplateGuard(tokenizer=...) (an object, "
                                 f"or the directory it was saved to), or train a LightningModule with a .tokenizer "
                                 f"attribute ({type(pl_module).__name__} has none; lightning_peft.CausalLMModule "
                                 f"loads the one saved with the model).")
            self._learn(tokenizer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._checked < self.check_batches:
            self._check(trainer, batch, batch_idx)

    def check_batch(self, batch: Any, batch_idx: int = 0) -> None:
        """Raise ``ValueError`` if a sample of ``batch`` fails a check."""
        if self.tokenizer is None:
            raise ValueError("ChatTemplateGuard.check_batch needs the tokenizer: ChatTemplateGuard(tokenizer=...).")
        if message := self._message(batch, batch_idx):
            raise ValueError(message)

    # ----------------------------------------------------------------------------------- worker
    def _check(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        self._checked += 1
        message = self._message(batch, batch_idx)
        # every rank raises together, so that none waits forever for the others in a collective
        if trainer.strategy.reduce_boolean_decision(message is not None, all=False):
            raise ValueError(message or "ChatTemplateGuard: a training batch on another rank failed the checks "
                                        "(its error says which and why).")

    def _message(self, batch: Any, batch_idx: int) -> str | None:
        rows = _rows(batch)
        failures = [(i, failure) for i, (ids, labels) in enumerate(rows) if (failure := self._failure(ids, labels))]
        if not failures:
            return None
        i, (problem, fix) = failures[0]
        ids, _ = rows[i]
        others = f" ({len(failures) - 1} more samples of this batch fail)" if len(failures) > 1 else ""
        return (f"ChatTemplateGuard: training batch {batch_idx}, sample {i}{others}: {problem}\n"
                f"  fix: {fix}\n"
                f"  sample: {_cut(self.tokenizer.decode(ids))}\n"
                f"  the template renders: {self.template.example!r}")

    def _failure(self, ids: list[int], labels: list[int]) -> tuple[str, str] | None:
        """The first problem of one sample (padding removed) and its fix, or None."""
        t, show = self.template, self._show
        render = ("render each conversation with tokenizer.apply_chat_template(messages, tokenize=False) and "
                  "tokenize the text with add_special_tokens=False")
        starts = _find(ids, t.header)
        if not starts:
            return (f"not rendered with this tokenizer's chat template: the assistant header {show(t.header)} never "
                    f"occurs.", render + ".")
        # <unk> is the data's (characters the vocabulary lacks), not markup
        foreign = sorted({token for token in ids if token in self._special_ids} - t.specials
                         - {self._pad_id, self.tokenizer.unk_token_id})
        if foreign:
            return (f"holds {show(foreign)}, special tokens this chat template never writes (rendered with another "
                    f"model's template, or by hand).", render + ".")
        if t.bos and tuple(ids[:len(t.bos)]) != t.bos:
            return f"does not start with {show(t.bos)}, which the template writes first.", render + "."
        if t.bos and tuple(ids[len(t.bos):2 * len(t.bos)]) == t.bos:
            return (f"starts with {show(t.bos)} twice: the tokenizer added its own to a text the template had "
                    f"already started with it.", "tokenize the rendered text with add_special_tokens=False.")
        spans = []
        for start in (s + len(t.header) for s in starts):
            close = next((k for k in range(start, len(ids))
                          if ids[k] in self._special_ids and ids[k] != self.tokenizer.unk_token_id), None)
            if close is None or ids[close] != t.end:
                return (f"an assistant reply is not closed by {show([t.end])} (truncated at the maximum length?).",
                        "raise the maximum length, or drop the samples longer than it instead of truncating them.")
            after = close + 1 + len(t.rest) if tuple(ids[close + 1:close + 1 + len(t.rest)]) == t.rest else close + 1
            spans.append((start, close, after))
        shifted = [k for k, (token, label) in enumerate(zip(ids, labels)) if label != IGNORE_INDEX and label != token]
        if shifted:
            return (f"labels differ from input_ids at {len(shifted)} trained positions (from position {shifted[0]}): "
                    f"shifted by one, or not built from these input_ids.",
                    "labels = input_ids.clone() with -100 where no loss is taken; the model shifts them itself.")
        if all(label == IGNORE_INDEX for label in labels):
            return ("nothing is trained: every label is -100.",
                    "keep the assistant replies in the labels (check that truncation did not cut them off).")
        for start, close, _ in spans:
            if labels[close] == IGNORE_INDEX and any(label != IGNORE_INDEX for label in labels[start:close]):
                trap = (f" pad_token is {show([self._pad_id])}, the end-of-turn token: the collator masked it as "
                        f"padding." if self._pad_id == t.end else "")
                return (f"labels mask the end-of-turn token {show([t.end])} of a trained reply: the model never "
                        f"learns to stop.{trap}",
                        f"keep {show([t.end])} in the labels: give the tokenizer a distinct pad token (e.g. "
                        f"tokenizer.pad_token = '<pad>' or another unused special token) and mask padding by "
                        f"attention_mask, not by token id.")
        reply = {k for start, _, after in spans for k in range(start, after)}
        prompt = [k for k, label in enumerate(labels) if label != IGNORE_INDEX and k not in reply]
        if prompt:
            return (f"{len(prompt)} prompt tokens are trained (labels != -100 outside the assistant replies): "
                    f"{_cut(' | '.join(self.tokenizer.decode([ids[k] for k in run]) for run in _runs(prompt)))}.",
                    f"set labels to -100 on the system/user turns and the {show(t.header)} headers: train on the "
                    f"assistant replies and their {show([t.end])} only.")
        return None

    @property
    def _pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def _show(self, ids) -> str:
        return repr(self.tokenizer.decode(list(ids)))


def _rows(batch: Any) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sample, padding (attention_mask == 0) removed."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        keys = f"keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(f"ChatTemplateGuard checks batches that are dicts with 'input_ids' and 'labels' (and "
                        f"optionally 'attention_mask'), [batch, seq] tensors; got {keys}.")
    ids, labels = torch.as_tensor(batch["input_ids"]).cpu(), torch.as_tensor(batch["labels"]).cpu()
    mask = batch.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).cpu().bool()
    if ids.ndim != 2 or labels.shape != ids.shape or keep.shape != ids.shape:
        raise TypeError(f"ChatTemplateGuard: input_ids, labels and attention_mask must be [batch, seq] tensors of one "
                        f"shape; got {tuple(ids.shape)}, {tuple(labels.shape)}, {tuple(keep.shape)}.")
    return [(ids[r][keep[r]].tolist(), labels[r][keep[r]].tolist()) for r in range(ids.shape[0])]


def _find(ids: list[int], pattern: tuple[int, ...]) -> list[int]:
    """Start positions of ``pattern`` in ``ids``."""
    n = len(pattern)
    return [k for k in range(len(ids) - n + 1) if ids[k] == pattern[0] and tuple(ids[k:k + n]) == pattern]


def _runs(positions: list[int]) -> list[list[int]]:
    """Ascending positions grouped into runs of consecutive ones."""
    runs: list[list[int]] = []
    for k in positions:
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _cut(text: str) -> str:
    return repr(text if len(text) <= _SHOW else text[:_SHOW // 2] + " [...] " + text[-_SHOW // 2:])
