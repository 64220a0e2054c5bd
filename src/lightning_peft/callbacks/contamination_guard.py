r"""``ContaminationGuard``: training examples that leak evaluation data, and exact duplicates.

An example is a sequence of tokens. Token-id examples: a list / 1-D tensor / array of ints, or a
dict with ``"input_ids"`` (and, if present, ``"attention_mask"``: only the tokens it marks count, so
padding never matches). Text examples: a string, or a dict with ``"text"``; compared as
whitespace-separated words, or as token ids when a ``tokenizer`` is given. A training example is
*contaminated* when it shares an n-gram (``ngram`` consecutive tokens; 13 as in GPT-3's
decontamination) with an evaluation example. An example shorter than ``ngram`` tokens is compared
as a whole: it matches only an identical short example.

Templated (chat) data: the chat template's markers and a shared system prompt put the same n-grams
in every example, which would match every evaluation example rendered the same way. So content is
compared, not boilerplate:

- a chat record (``{"messages": [...]}``, or ``{"prompt", "completion"}``) is compared by its
  message contents only, never by a rendering;
- with a ``tokenizer``, token-id examples are split at its special tokens (``<|im_start|>``,
  ``<|eot_id|>``, ...): no n-gram spans a template marker;
- an n-gram held by more than ``boilerplate`` (default 5%) of all the examples (training and
  evaluation together, and at least 3 of them) is boilerplate: a shared system prompt, a fixed
  instruction; so is a 4-gram held by more than half of them: the template's role headers
  (``<|im_end|>\n<|im_start|>assistant\n``), even between contents that differ. The tokens such n-grams cover are cut out, like special tokens, so
  that no n-gram straddles the template and the start of a message either. What is left are runs
  of content; a run shorter than ``ngram`` (a short message) is compared whole: it matches the
  same whole run elsewhere (unless that run is itself boilerplate, e.g. "Sure!" everywhere).
  A leak copied into that many examples is missed: lower ``boilerplate`` (``boilerplate=1`` turns
  the filter off). ``report.ignored_ngrams`` counts the distinct n-grams and runs ignored.

Every n-gram is hashed to 64 bits, vectorised over all windows at once (numpy, wrapping uint64):

    x_t = mix(token_t)                                (splitmix64 finalizer: ids spread over 64 bits)
    h_i = sum_{k<n} x_{i+k} * P^(n-1-k)   mod 2^64    (n multiply-adds over the whole token array)

Windows that cross an example boundary are dropped. The evaluation hashes are sorted once and every
training hash is looked up by binary search: O((W_train + W_eval) log W_eval) for W windows, no
pairwise comparison. Two different n-grams collide with probability ~2^-64 per pair: ~1e-7
expected false matches between 3.6M training and 0.45M evaluation windows (the benchmark's size).
Exact duplicates within the training data are found by comparing whole token sequences byte for
byte (a dict keyed by the sequence).

Where the data comes from during ``fit``: Lightning requests the dataloaders lazily, inside the
fit loop, after ``on_fit_start``. ``on_train_start`` is the first hook where
``trainer.train_dataloader`` is set, and ``trainer.val_dataloaders`` too when validation runs in
the first epoch or in the sanity check (the default); so the guard scans there, before the first
training batch.
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import (BatchSampler, ConcatDataset, DataLoader, DistributedSampler, RandomSampler,
                              SequentialSampler, Subset)

ON_HIT = ("warn", "raise", "drop")
MAX_EXAMPLES = 3  # examples quoted in a report
_FORMATS = ("token ids (a list or 1-D tensor of ints, or a dict with 'input_ids') or text (a string, or a dict "
            "with 'text')")
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible mod 2^64
_MARKER_LENGTH, _MARKER_SHARE = 4, 0.5  # 4-grams in over half the examples are template markers
_SEPARATOR = "\x1e"  # between the messages of a chat record: no n-gram crosses it
_BREAK = -1  # its token: never a real token id, and no n-gram holds it


@dataclass(frozen=True)
class ContaminationReport:
    """What :func:`find_contamination` found; indices are positions in the datasets it was given.

    Attributes:
        train_indices: contaminated training examples (sharing an n-gram with evaluation data), ascending.
        eval_indices: evaluation examples that some training example shares an n-gram with, ascending.
        matches: each contaminated training index -> the lowest evaluation index it shares an n-gram with.
        duplicate_groups: training indices with identical token sequences, in groups of two or more.
    """

    ngram: int
    n_train: int
    n_eval: int
    train_indices: list[int]
    eval_indices: list[int]
    matches: dict[int, int]
    duplicate_groups: list[list[int]]
    ignored_ngrams: int = 0  # distinct n-grams ignored as boilerplate (held by more than `boilerplate` of examples)

    @property
    def n_contaminated(self) -> int:
        return len(self.train_indices)

    @property
    def n_duplicates(self) -> int:
        """Redundant copies: the examples beyond the first of each duplicate group."""
        return sum(len(group) - 1 for group in self.duplicate_groups)

    def summary(self, train, eval, tokenizer=None) -> str:
        """Counts and a few examples (decoded by ``tokenizer`` if given; text examples as text);
        ``train``/``eval`` are the datasets this report was computed on. Empty if nothing was found."""
        return _describe(self, train, eval, tokenizer, lambda j: f"eval[{j}]")


def find_contamination(train, eval, ngram: int = 13, tokenizer=None, boilerplate: float = 0.05) -> ContaminationReport:
    """Find the training examples that share an ``ngram``-token sequence with ``eval``, and the
    exact duplicates within ``train``.

    ``train`` / ``eval``: map-style datasets (``len`` and indexing: lists, torch ``Dataset``,
    HF ``datasets.Dataset``) of token ids, text or chat records, see the module docstring.
    ``tokenizer`` (a transformers tokenizer) turns text into token ids and splits token ids at its
    special tokens; without it text is compared word by word. ``boilerplate``: n-grams held by more
    than this share of all examples are ignored (module docstring); 1 keeps them all.
    """
    _check_ngram(ngram)
    _check_boilerplate(boilerplate)
    train_seqs, train_kind = _sequences(train, "train", tokenizer)
    eval_seqs, eval_kind = _sequences(eval, "eval", tokenizer)
    if train_seqs and eval_seqs and train_kind != eval_kind:
        raise ValueError(f"find_contamination: the training data holds {train_kind} and the evaluation data "
                         f"{eval_kind}; pass tokenizer=... so that both are compared as token ids.")
    special = None if tokenizer is None else np.asarray(sorted(tokenizer.all_special_ids), dtype=np.int64)
    return _find(train_seqs, eval_seqs, ngram, boilerplate, special if train_kind == "token ids" else None)


def drop_contaminated(train, eval, ngram: int = 13, tokenizer=None, boilerplate: float = 0.05) -> Subset:
    """``train`` without the examples that share an n-gram with ``eval``: a ``torch.utils.data.Subset``
    to build the training DataLoader from (e.g. in ``LightningDataModule.setup``). Duplicates are kept."""
    report = find_contamination(train, eval, ngram, tokenizer, boilerplate)
    return Subset(train, _kept(report))


class ContaminationGuard(Callback):
    """Scan the training data against the validation data when training starts.

    Args:
        ngram: n-gram length in tokens (words for text without a tokenizer).
        on_hit: what to do about contaminated training examples: ``"warn"`` (report them),
            ``"raise"`` (stop before the first step) or ``"drop"`` (report, then train on the
            training dataset without them). Exact duplicates within the training data are always
            reported, never dropped (repeating data can be deliberate).
        tokenizer: a transformers tokenizer (or the path of a directory saved with
            ``save_pretrained``, e.g. from a YAML config): decodes the quoted examples, tokenizes
            text datasets and splits token ids at its special tokens.
        boilerplate: n-grams held by more than this share of all examples are ignored (template
            markers, a shared system prompt); see the module docstring. 1 keeps them all.
        max_drop: ``on_hit="drop"`` raises instead of training on what is left when more than this
            share of the training examples would be dropped (almost everything "contaminated" is
            a sign that the comparison sees shared boilerplate, not leaks).

    The training data is ``trainer.train_dataloader.dataset`` (one map-style DataLoader); the
    evaluation data is the dataset of every validation dataloader. ``report`` holds the last
    :class:`ContaminationReport`.

    ``on_hit="drop"`` rebuilds the training DataLoader over ``Subset(dataset, clean indices)`` (same
    batch size, shuffling, collate function, workers) and has Lightning set it up again; this needs a
    plain ``torch.utils.data.DataLoader`` with a default sampler and no
    ``reload_dataloaders_every_n_epochs``. Otherwise, or to keep Lightning's internals out of it,
    build the loader from :func:`drop_contaminated` yourself.
    """

    def __init__(self, ngram: int = 13, on_hit: str = "warn", tokenizer=None, boilerplate: float = 0.05,
                 max_drop: float = 0.25) -> None:
        _check_ngram(ngram)
        _check_boilerplate(boilerplate)
        if on_hit not in ON_HIT:
            raise ValueError(f"ContaminationGuard(on_hit={on_hit!r}): choose one of {', '.join(map(repr, ON_HIT))}.")
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop <= 1:
            raise ValueError(f"ContaminationGuard(max_drop={max_drop!r}): give the largest share of the training "
                             f"examples on_hit='drop' may remove, in [0, 1] (default 0.25).")
        from ..data.tokenizer import load_tokenizer
        self.ngram = ngram
        self.on_hit = on_hit
        self.tokenizer = load_tokenizer(tokenizer, "ContaminationGuard") if tokenizer is not None else None
        self.boilerplate = boilerplate
        self.max_drop = max_drop
        self.report: ContaminationReport | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.train_dataloader is not None:
            self._scan(trainer)

    # ----------------------------------------------------------------------------------- worker
    def _scan(self, trainer: pl.Trainer) -> None:
        (loader,) = _loaders(trainer.train_dataloader, "training")
        if self.on_hit == "drop" and trainer.reload_dataloaders_every_n_epochs:
            raise ValueError("ContaminationGuard(on_hit='drop') cannot be combined with "
                             "Trainer(reload_dataloaders_every_n_epochs=...): the reloaded loaders would hold the "
                             "contaminated examples again. Build them from lightning_peft.callbacks."
                             "drop_contaminated(train, val) in your train_dataloader() instead.")
        evals = [dl.dataset for dl in _loaders(trainer.val_dataloaders, "validation")]
        joined = ConcatDataset(evals) if len(evals) > 1 else (evals[0] if evals else [])

        start = time.perf_counter()
        report = self.report = find_contamination(loader.dataset, joined, self.ngram, self.tokenizer, self.boilerplate)
        lines = [f"ContaminationGuard: scanned {report.n_train:,} training and {report.n_eval:,} validation examples "
                 f"({self.ngram}-grams) in {time.perf_counter() - start:.2f} s."]
        if not evals:
            lines.append("No validation dataloader was set up at train start (no validation, or the first one comes "
                         "in a later epoch and num_sanity_val_steps=0): only exact duplicates within the training "
                         "data were checked.")

        def eval_name(j: int) -> str:
            if len(evals) == 1:
                return f"val[{j}]"
            k = bisect.bisect_right(joined.cumulative_sizes, j)
            return f"val dataloader {k}[{j - ([0] + joined.cumulative_sizes)[k]}]"

        if found := _describe(report, loader.dataset, joined, self.tokenizer, eval_name):
            lines.append(found)
        hit = trainer.strategy.reduce_boolean_decision(report.n_contaminated > 0, all=False)
        if hit and self.on_hit == "raise":
            raise RuntimeError("\n".join(lines) + "\nRemove them before training: build the training DataLoader from "
                               "lightning_peft.callbacks.drop_contaminated(train, val), or use "
                               "ContaminationGuard(on_hit='drop').")
        if hit and self.on_hit == "drop" and report.n_contaminated > self.max_drop * report.n_train:
            raise RuntimeError("\n".join(lines) + f"\nContaminationGuard(on_hit='drop') would drop "
                               f"{report.n_contaminated:,} of {report.n_train:,} training examples "
                               f"({report.n_contaminated / max(1, report.n_train):.0%}, more than max_drop="
                               f"{self.max_drop:g}) and train on what is left. So much overlap is rarely real "
                               f"leakage: check the quoted shared text. If it is a template or a system prompt, "
                               f"compare message contents (chat records), pass tokenizer=... so that template "
                               f"markers split the n-grams, or lower boilerplate; if the leak is real, remove it "
                               f"from the data, or raise max_drop.")
        if hit and self.on_hit == "drop":
            _train_on(trainer, loader, Subset(loader.dataset, _kept(report)))
            lines.append(f"Dropped the {report.n_contaminated:,} contaminated examples: training on "
                         f"{report.n_train - report.n_contaminated:,}.")
        if len(lines) > 1:
            rank_zero_warn("\n".join(lines))
        else:
            rank_zero_info(f"{lines[0]} No overlap, no duplicates.")


def _check_ngram(ngram: int) -> None:
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"ngram={ngram!r}: give the n-gram length in tokens, an int >= 1 (13 is the usual choice).")


def _check_boilerplate(boilerplate: float) -> None:
    if isinstance(boilerplate, bool) or not isinstance(boilerplate, (int, float)) or not 0 < boilerplate <= 1:
        raise ValueError(f"boilerplate={boilerplate!r}: give the share of examples above which a shared n-gram is "
                         f"ignored as template text, in (0, 1] (default 0.05; 1 ignores nothing).")


def _kept(report: ContaminationReport) -> list[int]:
    dropped = set(report.train_indices)
    return [i for i in range(report.n_train) if i not in dropped]


# ---------------------------------------------------------------------------------- reading data
def _sequences(dataset, role: str, tokenizer) -> tuple[list[np.ndarray], str]:
    """Every example of ``dataset`` as a 1-D int64 array, and what the arrays hold: ``"token ids"``
    or ``"text"`` (hashes of whitespace-separated words)."""
    try:
        size = len(dataset)
    except TypeError:
        raise TypeError(f"The {role} data ({type(dataset).__name__}) has no len(): contamination is checked on "
                        f"map-style datasets (len + indexing). For an IterableDataset, run find_contamination on "
                        f"the examples (e.g. a list) before streaming them.") from None
    examples = [_example(dataset[i], role, i) for i in range(size)]
    texts = [i for i, example in enumerate(examples) if isinstance(example, str)]
    if not texts:
        return examples, "token ids"
    if tokenizer is None and len(texts) < size:
        raise ValueError(f"The {role} data mixes text and token ids; pass tokenizer=... so that the text is "
                         f"compared as token ids too.")
    parts = [part for i in texts for part in examples[i].split(_SEPARATOR)]
    if tokenizer is not None:
        encoded = iter(tokenizer(parts, add_special_tokens=False)["input_ids"]) if parts else iter(())
    else:
        encoded = (list(map(hash, part.split())) for part in parts)
    for i in texts:
        ids = []
        for k in range(examples[i].count(_SEPARATOR) + 1):
            ids += ([_BREAK] if k else []) + list(next(encoded))
        examples[i] = np.asarray(ids, dtype=np.int64)
    return examples, "token ids" if tokenizer is not None else "text"


def _example(item: Any, role: str, index: int) -> str | np.ndarray:
    """One example as text or as a 1-D int64 array of token ids. A chat record is its message
    contents (one per line), without any template."""
    if isinstance(item, Mapping) and ("messages" in item or ("prompt" in item and "completion" in item)):
        from ..data.tokenize import message_texts
        return _SEPARATOR.join(message_texts(item))
    if isinstance(item, Mapping) and "input_ids" in item:
        ids = _example(item["input_ids"], role, index)
        mask = item.get("attention_mask")
        return ids if mask is None else ids[np.asarray(mask, dtype=bool)]
    text = item.get("text") if isinstance(item, Mapping) else item
    if isinstance(text, str):
        return text
    if isinstance(item, torch.Tensor) and item.ndim == 1 and not (item.is_floating_point() or item.is_complex()):
        return item.cpu().numpy().astype(np.int64, copy=False)
    if isinstance(item, (list, tuple, np.ndarray)) and not isinstance(item, torch.Tensor):
        array = np.asarray(item)
        if array.ndim == 1 and (array.dtype.kind in "iu" or array.size == 0):
            return array.astype(np.int64, copy=False)
    raise TypeError(f"{role}[{index}] is {_shape_of(item)}; contamination is checked on {_FORMATS}.")


def _shape_of(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return f"a {item.ndim}-D {item.dtype} tensor"
    if isinstance(item, Mapping):
        return f"a dict with keys {sorted(map(str, item))} (neither 'input_ids' nor 'text')"
    return f"a {type(item).__name__}"


# --------------------------------------------------------------------------------------- hashing
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (a bijection that spreads nearby ids apart)."""
    x = x ^ (x >> np.uint64(30))
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    return x ^ (x >> np.uint64(31))


class _Windows:
    """The n-gram windows of one dataset: every example's tokens concatenated, one 64-bit hash per
    window start; ``cut`` marks the positions no n-gram may hold (special tokens, message breaks)."""

    def __init__(self, seqs: list[np.ndarray], n: int, special: np.ndarray | None) -> None:
        self.n = n
        lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
        self.total = int(lengths.sum())
        self.x = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
        self.owner_at = np.repeat(np.arange(len(seqs)), lengths)
        self.ends = np.cumsum(lengths)
        cuts = np.asarray([_BREAK] if special is None else [_BREAK, *special], dtype=np.int64)
        self.cut = np.isin(self.x, cuts)
        self.windows = max(0, self.total - n + 1)
        if self.windows:
            mixed = _mix(self.x.view(np.uint64))
            h = mixed[:self.windows].copy()
            for k in range(1, n):  # Horner: h = (...(x_i P + x_{i+1}) P + ...) + x_{i+n-1}
                h *= _BASE
                h += mixed[k:k + self.windows]
            self.h = h
            owner = self.owner_at[:self.windows]
            self.inside = np.arange(self.windows) + n <= self.ends[owner]  # the window ends within its example
        else:
            self.h, self.inside = np.zeros(0, np.uint64), np.zeros(0, bool)

    def _free(self, blocked: np.ndarray) -> np.ndarray:
        """Windows inside an example that hold no ``blocked`` position."""
        marks = np.concatenate([[0], np.cumsum(blocked)])
        return self.inside & (marks[self.n:self.n + self.windows] == marks[:self.windows])

    def covered(self, common: np.ndarray, blocked: np.ndarray) -> np.ndarray:
        """The positions that a free window whose hash is in ``common`` covers."""
        if not len(common) or not self.windows:
            return np.zeros(self.total, bool)
        hit = self._free(blocked) & np.isin(self.h, common)
        starts = np.concatenate([[0], np.cumsum(hit)])  # covered: some hit window starts in [p - n + 1, p]
        p = np.arange(self.total)
        return starts[np.minimum(p + 1, self.windows)] - starts[np.clip(p - self.n + 1, 0, self.windows)] > 0

    def hashes(self, blocked: np.ndarray, short: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(hashes, owners)``: the n-grams free of ``blocked`` positions (cut, or covered by
        boilerplate); plus, with ``short``, one hash per run of free positions shorter than ``n``
        between blocked positions (a short message: it matches only the same whole run)."""
        free = self._free(blocked) if self.windows else self.inside
        h, owner = self.h[free], self.owner_at[:self.windows][free]
        if not short:
            return h, owner
        short_h, short_owner = self._short_runs(blocked)
        return np.concatenate([h, short_h]), np.concatenate([owner, short_owner])

    def _short_runs(self, blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not blocked.any():  # no template, no breaks: examples are compared whole by _short_matches
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        # runs of free positions, broken at blocked positions and at example starts
        first = np.concatenate([[0], self.ends[:-1]]).astype(np.int64)
        starts = np.zeros(self.total, bool)
        starts[first[first < self.total]] = True
        values, owners = [], []
        free = np.flatnonzero(~blocked)
        if not len(free):
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        new_run = np.ones(len(free), bool)
        new_run[1:] = (np.diff(free) > 1) | starts[free[1:]]
        run_starts = np.flatnonzero(new_run)
        run_ends = np.concatenate([run_starts[1:], [len(free)]])
        for a, b in zip(run_starts.tolist(), run_ends.tolist()):
            if b - a < self.n:
                segment = self.x[free[a]:free[b - 1] + 1]
                digest = hashlib.blake2b(segment.tobytes(), digest_size=8, person=b"short").digest()
                values.append(np.frombuffer(digest, np.uint64)[0])
                owners.append(self.owner_at[free[a]])
        return np.asarray(values, np.uint64), np.asarray(owners, np.int64)


def _document_frequency(h: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct hashes and how many examples hold each."""
    order = np.lexsort((owner, h))
    hs, os = h[order], owner[order]
    first = np.ones(len(hs), dtype=bool)
    first[1:] = (hs[1:] != hs[:-1]) | (os[1:] != os[:-1])
    return np.unique(hs[first], return_counts=True)


def _boilerplate(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], share: float,
                 examples: int) -> np.ndarray:
    """The hashes held by more than ``share`` of all ``examples`` (and by at least 3)."""
    if share >= 1 or not (len(a[0]) or len(b[0])):
        return np.zeros(0, np.uint64)
    (ha, ca), (hb, cb) = _document_frequency(*a), _document_frequency(*b)
    hashes, inverse = np.unique(np.concatenate([ha, hb]), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate([ca, cb]), minlength=len(hashes))
    return hashes[(counts > share * examples) & (counts >= 3)]


def _find(train: list[np.ndarray], eval: list[np.ndarray], n: int, boilerplate: float = 1.0,
          special: np.ndarray | None = None) -> ContaminationReport:
    matches = _short_matches(train, eval, n)
    matched_short = {train[i].tobytes() for i in matches}
    eval_hit = {j for j, s in enumerate(eval) if 0 < len(s) < n and s.tobytes() in matched_short}

    examples = len(train) + len(eval)
    sides = _Windows(train, n, special), _Windows(eval, n, special)
    blocked = [side.cut for side in sides]
    common_markers = np.zeros(0, np.uint64)
    if boilerplate < 1:  # template markers: short k-grams in most examples (role headers between contents)
        k = min(_MARKER_LENGTH, n)
        short_sides = sides if k == n else (_Windows(train, k, special), _Windows(eval, k, special))
        common_markers = _boilerplate(*(side.hashes(side.cut, short=False) for side in short_sides),
                                      _MARKER_SHARE, examples)
        blocked = [b | side.covered(common_markers, side.cut) for b, side in zip(blocked, short_sides)]
    common = _boilerplate(*(side.hashes(b) for side, b in zip(sides, blocked)), boilerplate, examples)
    blocked = [b | side.covered(common, b) for b, side in zip(blocked, sides)]
    (train_hash, train_owner), (eval_hash, eval_owner) = (side.hashes(b) for side, b in zip(sides, blocked))
    common_runs = _boilerplate((train_hash, train_owner), (eval_hash, eval_owner), boilerplate, examples)
    ignored = len(common_markers) + len(common) + len(common_runs)
    if len(common_runs):  # whole short runs shared by many examples (a role name, "Sure!")
        keep = ~np.isin(train_hash, common_runs)
        train_hash, train_owner = train_hash[keep], train_owner[keep]
        keep = ~np.isin(eval_hash, common_runs)
        eval_hash, eval_owner = eval_hash[keep], eval_owner[keep]
    if len(train_hash) and len(eval_hash):
        # first occurrence = lowest evaluation index holding that n-gram (owners ascend with position)
        unique, first = np.unique(eval_hash, return_index=True)
        where = np.minimum(np.searchsorted(unique, train_hash), len(unique) - 1)
        hit = unique[where] == train_hash
        owners, partners = train_owner[hit], eval_owner[first[where[hit]]]
        order = np.lexsort((partners, owners))
        owners, partners = owners[order], partners[order]
        contaminated, start = np.unique(owners, return_index=True)
        matches.update(zip(contaminated.tolist(), partners[start].tolist()))
        eval_hit.update(np.unique(eval_owner[np.isin(eval_hash, train_hash[hit])]).tolist())

    groups: dict[bytes, list[int]] = {}
    for i, s in enumerate(train):
        groups.setdefault(s.tobytes(), []).append(i)
    return ContaminationReport(ngram=n, n_train=len(train), n_eval=len(eval), train_indices=sorted(matches),
                               eval_indices=sorted(eval_hit), matches=dict(sorted(matches.items())),
                               duplicate_groups=[g for g in groups.values() if len(g) > 1], ignored_ngrams=ignored)


def _short_matches(train: list[np.ndarray], eval: list[np.ndarray], n: int) -> dict[int, int]:
    """Training examples shorter than ``n`` tokens that equal an evaluation example, -> its lowest index."""
    short = {}
    for j, s in enumerate(eval):
        if 0 < len(s) < n:
            short.setdefault(s.tobytes(), j)
    return {i: short[s.tobytes()] for i, s in enumerate(train) if 0 < len(s) < n and s.tobytes() in short}


# ------------------------------------------------------------------------------------- reporting
def _describe(report: ContaminationReport, train, eval, tokenizer, eval_name: Callable[[int], str]) -> str:
    lines = []
    if report.train_indices:
        lines.append(f"{report.n_contaminated:,} of {report.n_train:,} training examples share a {report.ngram}-token "
                     f"sequence with {len(report.eval_indices):,} of {report.n_eval:,} evaluation examples; e.g.")
        for i in report.train_indices[:MAX_EXAMPLES]:
            j = report.matches[i]
            ours, theirs = _tokens(train[i], tokenizer), _tokens(eval[j], tokenizer)
            shared = _shared(ours, theirs, report.ngram)
            lines.append(f"  train[{i}] and {eval_name(j)} share {_show(shared, tokenizer)}\n"
                         f"    train[{i}]: {_show(ours, tokenizer)}")
        if report.n_contaminated > MAX_EXAMPLES:
            lines.append(f"  ... and {report.n_contaminated - MAX_EXAMPLES:,} more (report.train_indices).")
        if report.n_contaminated > report.n_train // 2:
            lines.append(f"  Most examples match: a prompt template or system prompt of {report.ngram}+ tokens "
                         f"shared by both datasets matches everywhere; compare the examples without it, or raise "
                         f"ngram.")
    if report.duplicate_groups:
        lines.append(f"{report.n_duplicates:,} redundant copies in {len(report.duplicate_groups):,} groups of "
                     f"identical training examples; e.g.")
        for group in report.duplicate_groups[:MAX_EXAMPLES]:
            copies = " == ".join(f"train[{i}]" for i in group[:4]) + (" == ..." if len(group) > 4 else "")
            lines.append(f"  {copies} ({len(group)} copies): {_show(_tokens(train[group[0]], tokenizer), tokenizer)}")
    return "\n".join(lines)


def _tokens(item: Any, tokenizer) -> list:
    """An example as the tokens it is compared by: token ids, or words of text."""
    example = _example(item, "", 0)
    if not isinstance(example, str):
        return example.tolist()
    example = example.replace(_SEPARATOR, "\n")
    return tokenizer(example, add_special_tokens=False)["input_ids"] if tokenizer is not None else example.split()


def _shared(a: list, b: list, n: int) -> list:
    """The last n-gram of ``a`` that ``b`` holds too (the whole of ``a`` when it is shorter than ``n``):
    the last, because shared boilerplate (a system prompt) comes first."""
    if len(a) < n:
        return a
    grams = {tuple(b[k:k + n]) for k in range(len(b) - n + 1)}
    return next((list(a[k:k + n]) for k in reversed(range(len(a) - n + 1)) if tuple(a[k:k + n]) in grams), [])


def _show(tokens: Sequence, tokenizer, limit: int = 160) -> str:
    """Words or decoded ids as a quoted string; ids without a tokenizer as a list (cut at ``limit`` chars)."""
    if tokens and isinstance(tokens[0], str):
        text = repr(" ".join(tokens))
    elif tokenizer is not None:
        text = repr(tokenizer.decode(tokens))
    else:
        text = f"ids {list(tokens)}"
    return text if len(text) <= limit else text[:limit] + " ..."


# ------------------------------------------------------------------------ swapping the train loader
def _loaders(loaders: Any, role: str) -> list[DataLoader]:
    """The DataLoaders in ``trainer.train_dataloader`` / ``val_dataloaders`` (one, or a collection)."""
    flat = [] if loaders is None else CombinedLoader(loaders).flattened
    if not all(isinstance(dl, DataLoader) for dl in flat) or (role == "training" and len(flat) != 1):
        raise TypeError(f"ContaminationGuard reads the dataset of one training DataLoader and of each validation "
                        f"DataLoader; the {role} data of this fit is {', '.join(type(x).__name__ for x in flat)}. "
                        f"Run lightning_peft.callbacks.find_contamination on the datasets yourself instead.")
    return flat


def _train_on(trainer: pl.Trainer, loader: DataLoader, dataset: Subset) -> None:
    """Continue the fit on ``loader`` rebuilt over ``dataset``.

    Lightning owns the training DataLoader and offers no public way to replace it during ``fit``.
    This points the fit loop's data source at the rebuilt loader and reruns Lightning's own
    ``fit_loop.setup_data()``, the path ``reload_dataloaders_every_n_epochs`` takes: it re-injects
    the distributed sampler, recounts the batches (``num_training_batches``, ``val_check_batch``)
    and creates the iterator. Private attributes touched: ``fit_loop._data_fetcher`` (torn down,
    which stops the old iterator's workers), ``_data_source`` and ``_combined_loader``.
    Learning-rate schedules sized from ``trainer.estimated_stepping_batches`` were sized before the
    drop (for the full dataset).
    """
    sampler = loader.sampler
    default = (type(sampler) in (SequentialSampler, DistributedSampler)
               or (type(sampler) is RandomSampler and not sampler.replacement))
    if type(loader) is not DataLoader or type(loader.batch_sampler) is not BatchSampler or not default:
        raise TypeError(f"ContaminationGuard(on_hit='drop') rebuilds the training DataLoader over the clean "
                        f"examples, which it can do for a plain torch DataLoader with a sequential or random "
                        f"sampler, not for this {type(loader).__name__} (sampler {type(sampler).__name__}, "
                        f"batch sampler {type(loader.batch_sampler).__name__}). Build your loader from "
                        f"lightning_peft.callbacks.drop_contaminated(train, val) instead.")
    shuffle = type(sampler) is RandomSampler or (type(sampler) is DistributedSampler and sampler.shuffle)
    rebuilt = DataLoader(dataset, batch_size=loader.batch_size, shuffle=shuffle, num_workers=loader.num_workers,
                         collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                         timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                         multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                         prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                         pin_memory_device=loader.pin_memory_device,
                         **({"in_order": loader.in_order} if hasattr(loader, "in_order") else {}))  # torch >= 2.6
    fit_loop = trainer.fit_loop
    fit_loop._data_fetcher.teardown()
    fit_loop._data_source.instance = rebuilt
    fit_loop._combined_loader = None
    fit_loop.setup_data()
