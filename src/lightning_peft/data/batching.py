r"""Batches of tokenized examples: padding collation, packing, length-grouped sampling.

Padding (:class:`ChatCollator`): right-pad ``input_ids`` with the pad id, ``labels`` with -100 and
``attention_mask`` with 0. Padding is masked by position, never by token id, so an end-of-turn
token that equals the pad id (pad == eos) stays trained.

Packing (:func:`pack_examples`): several examples in one row, first-fit by decreasing length, up to
``max_length`` tokens. Each row carries ``position_ids`` that restart at 0 at every example and
``seq_lens`` (the examples' lengths, in order). The first label of each example is set to -100:
unpacked, nothing predicts an example's first token; packed, the previous example's last token
would. A collated packed batch has ``position_ids`` and no ``attention_mask``; its right padding
forms one more "example" (positions from 0, labels -100).

Attention does not cross examples only where the backend reads the boundaries from
``position_ids``. With transformers models (Llama, Mistral, Qwen2, Gemma, ... i.e. those built on
``masking_utils``) that is the case for ``attn_implementation="flash_attention_2"`` (varlen
kernels) and for ``"sdpa"`` and ``"eager"``, which build a block-diagonal causal mask from the
position resets when no ``attention_mask`` is passed and no KV cache is made: call the model with
``use_cache=False`` (:class:`~lightning_peft.CausalLMModule` does; a model called with its default
``use_cache=True`` builds a cache even in training mode, and transformers then skips the packed
sequence detection, so examples attend across boundaries). Then the packed loss of every example equals
its unpacked loss (up to float rounding; tests/test_data.py checks it on a tiny Llama with sdpa and
eager). A model that ignores ``position_ids``, or a batch given an ``attention_mask``, lets each
example attend to the ones before it in its row: packing is then an approximation.

Length grouping (:class:`LengthGroupedSampler`): shuffle, cut into mega-batches of
``batch_size * mega`` examples, sort each by length, cut into batches, shuffle the batches: little
padding, still random order. Seeded and epoch-aware (``set_epoch``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from .tokenize import IGNORE_INDEX


class ChatCollator:
    """Pad a list of tokenized examples into a batch of ``[batch, seq]`` tensors.

    Args:
        pad_token_id: the id written into padded positions (any id: padding is masked by position).
        pad_to_multiple_of: round the width up (e.g. 8 for tensor cores).

    Examples with ``position_ids`` (packed rows) give ``input_ids``, ``labels`` and ``position_ids``
    and no ``attention_mask`` (see the module docstring); others give ``input_ids``, ``labels`` and
    ``attention_mask``.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("ChatCollator(pad_token_id=None): give the id to write into padded positions (the "
                             "tokenizer's pad_token_id, or its eos_token_id: padding is masked by position, so any "
                             "id works).")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("ChatCollator: an empty batch.")
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in examples[0]
        ids, labels, extra = [], [], []
        for e in examples:
            n = len(e["input_ids"])
            pad = width - n
            ids.append(list(e["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(e["labels"]) + [IGNORE_INDEX] * pad)
            extra.append(list(e["position_ids"]) + list(range(pad)) if packed else [1] * n + [0] * pad)
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        batch["position_ids" if packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
        return batch


def pack_examples(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack tokenized examples into rows of at most ``max_length`` tokens (first fit, longest first).

    Each row: ``input_ids``, ``labels`` (each example's first label -100), ``position_ids`` (0, 1, ...
    within each example), ``seq_lens`` and ``example_indices`` (the positions in ``examples``).
    An example longer than ``max_length`` is an error (drop or split it first)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"pack_examples(max_length={max_length!r}): give the row length in tokens, an int >= 1.")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"pack_examples: example {i} has {n} tokens, more than max_length={max_length}; drop "
                             f"it or tokenize with max_length (and overflow='drop' or 'turns') first.")
        if n == 0:
            continue
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "example_indices": members}
        for i in members:
            e = examples[i]
            row["input_ids"] += list(e["input_ids"])
            row["labels"] += [IGNORE_INDEX] + list(e["labels"][1:])
            row["position_ids"] += list(range(len(e["input_ids"])))
            row["seq_lens"].append(len(e["input_ids"]))
        packed.append(row)
    return packed


class LengthGroupedSampler(Sampler[list[int]]):
    """A batch sampler whose batches hold examples of similar length, in random order.

    Args:
        lengths: the length of each example.
        batch_size: examples per batch.
        mega: batches per sorted group (larger: less padding, less randomness).
        seed: the shuffling seed; the order of epoch ``e`` (``set_epoch``) uses ``seed + e``.
        drop_last: drop a last, smaller batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, mega: int = 50, seed: int = 0,
                 drop_last: bool = False) -> None:
        if batch_size < 1 or mega < 1:
            raise ValueError(f"LengthGroupedSampler(batch_size={batch_size}, mega={mega}): both must be >= 1.")
        self.lengths = list(lengths)
        self.batch_size, self.mega, self.seed, self.drop_last = batch_size, mega, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        group = self.batch_size * self.mega
        batches = []
        for g in range(0, len(order), group):
            chunk = sorted(order[g:g + group], key=lambda i: -self.lengths[i])
            batches += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for k in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[k]

    def __len__(self) -> int:
        n, group = len(self.lengths), self.batch_size * self.mega
        sizes = [min(group, n - g) for g in range(0, n, group)]
        if self.drop_last:
            return sum(size // self.batch_size for size in sizes)
        return sum(math.ceil(size / self.batch_size) for size in sizes)
