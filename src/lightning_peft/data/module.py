r"""``ChatDataModule``: JSONL (or in-memory) chat data -> deduplicated, decontaminated, masked batches.

What ``setup`` does, in order, on every rank (the same seed gives the same data everywhere):

1. read the training records (and the validation ones, if given): JSONL files (one JSON object a
   line) or lists; each record is ``{"messages": [{"role", "content"}, ...]}``,
   ``{"prompt", "completion"}`` or ``{"text"}`` (a bare list of messages is a conversation);
2. drop exact duplicates (normalized contents) and near duplicates (word-shingle Jaccard >=
   ``near_duplicate_threshold``, MinHash LSH), see :mod:`lightning_peft.data.dedup`;
3. drop the records that share an ``ngram``-token sequence of content (or a whole short message)
   with an example of ``eval_sets`` (the benchmarks you will report);
4. without ``val``: a seeded split, ``val_fraction`` of the records for validation; training
   records that overlap the validation split are dropped too;
   :func:`~lightning_peft.callbacks.find_contamination` on the message contents, boilerplate
   shared by many examples ignored;
5. tokenize (:func:`~lightning_peft.data.tokenize_example`): loss on the assistant replies only;
   conversations longer than ``max_length`` handled by ``overflow`` and counted;
6. optionally pack (:func:`~lightning_peft.data.pack_examples`).

The counts of each step are printed as a rich table (rank zero) and kept in ``stats``. The first
time it runs under a Trainer, it writes ``review_file`` (``sft_review.md``) to the trainer's log
directory: ``review_examples`` (50) training examples as the model sees them, decoded, with every
trained span between ``⟦`` and ``⟧``. Read them yourself before the run.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_write
from .batching import ChatCollator, LengthGroupedSampler, pack_examples
from .dedup import exact_duplicates, near_duplicates
from .tokenize import IGNORE_INDEX, OVERFLOW, example_kind, message_texts, tokenize_example
from .tokenizer import load_tokenizer

Records = str | os.PathLike | Sequence[Any]
OPEN, CLOSE = "⟦", "⟧"


class TokenizedDataset(Dataset):
    """A list of tokenized examples (dicts of ``input_ids``, ``attention_mask``, ``labels``, or packed
    rows with ``position_ids``)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def read_records(source: Records, what: str = "data") -> list[Any]:
    """Records from a JSONL path (or a list of paths) or an in-memory list, each checked for its form."""
    if isinstance(source, (str, os.PathLike)):
        sources = [source]
    elif isinstance(source, Sequence) and source and all(isinstance(s, (str, os.PathLike)) for s in source) \
            and all(Path(s).suffix in (".jsonl", ".json") for s in source):
        sources = list(source)
    elif isinstance(source, Sequence):
        records = list(source)
        for k, record in enumerate(records):
            _kind(record, f"{what}[{k}]")
        return records
    else:
        raise TypeError(f"ChatDataModule: {what} must be a JSONL path, a list of paths or a list of records, got "
                        f"{type(source).__name__}.")
    records = []
    for path in map(Path, sources):
        if not path.is_file():
            raise ValueError(f"ChatDataModule: {what} file {path} does not exist (give a JSONL file: one JSON "
                             f"object a line).")
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"ChatDataModule: {path}:{n} is not valid JSON ({err.msg}); each line of a "
                                     f"JSONL file is one JSON object.") from None
                _kind(record, f"{path}:{n}")
                records.append(record)
    return records


def _kind(record: Any, where: str) -> str:
    try:
        return example_kind(record)
    except ValueError as err:
        raise ValueError(f"ChatDataModule: {where}: {err}") from None


def _content(record: Any) -> str:
    return "\n".join(message_texts(record))


class ChatDataModule(L.LightningDataModule):
    """Chat / instruction data for supervised fine-tuning: see the module docstring.

    Args:
        train: training records: a JSONL path, a list of paths, or a list of records.
        val: validation records (same forms); None: split ``val_fraction`` off ``train``.
        tokenizer: a transformers tokenizer with the model's chat template, or the directory it was
            saved to; None: the LightningModule's ``tokenizer`` (CausalLMModule loads the one saved
            with the model).
        eval_sets: records (paths or lists) of the benchmarks you will evaluate on; training
            records that overlap them are dropped before training. A dict ``{name: records}``
            names them in the table.
        val_fraction / seed: the seeded split when ``val`` is None.
        max_length / overflow: longest example in tokens, and what to do with longer
            conversations: ``"drop"``, ``"keep"`` or ``"turns"`` (see :func:`tokenize_chat`).
        batch_size / num_workers: the DataLoaders'.
        packing: pack several examples per row of ``max_length`` tokens (see
            :mod:`lightning_peft.data.batching` for when this is exact).
        group_by_length: batch examples of similar length (less padding; one device).
        deduplicate / near_duplicate_threshold: drop exact and near duplicates (Jaccard of word
            5-gram shingles >= threshold); threshold 1 keeps near duplicates.
        ngram: n-gram length (tokens, or words without a tokenizer) for decontamination.
        review_examples / review_file: how many rendered training examples to write to the log
            directory, and the file name (0: none).
    """

    def __init__(self, train: Records | None = None, val: Records | None = None, tokenizer: Any = None,
                 eval_sets: Records | Mapping[str, Records] | None = None, val_fraction: float = 0.05, seed: int = 0,
                 max_length: int = 2048, overflow: str = "drop", batch_size: int = 8, num_workers: int = 0,
                 packing: bool = False, group_by_length: bool = False, deduplicate: bool = True,
                 near_duplicate_threshold: float = 0.8, ngram: int = 13, review_examples: int = 50,
                 review_file: str = "sft_review.md") -> None:
        super().__init__()
        if overflow not in OVERFLOW:
            raise ValueError(f"ChatDataModule(overflow={overflow!r}): choose one of {', '.join(map(repr, OVERFLOW))}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"ChatDataModule(val_fraction={val_fraction!r}): give a share in [0, 1).")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"ChatDataModule(max_length={max_length!r}): give the longest example in tokens, an "
                             f"int >= 2.")
        self.train_source, self.val_source, self.eval_sets = train, val, eval_sets
        self._tokenizer = tokenizer
        self.val_fraction, self.seed = val_fraction, seed
        self.max_length, self.overflow = max_length, overflow
        self.batch_size, self.num_workers = batch_size, num_workers
        self.packing, self.group_by_length = packing, group_by_length
        self.deduplicate, self.near_duplicate_threshold, self.ngram = deduplicate, near_duplicate_threshold, ngram
        self.review_examples, self.review_file = review_examples, review_file
        self.stats: dict[str, int] = {}
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self.train_records: list[Any] = []
        self.val_records: list[Any] = []
        self.review_path: Path | None = None

    # ----------------------------------------------------------------------------------- setup
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            found = getattr(module, "tokenizer", None)
            if found is None:
                raise ValueError("ChatDataModule: no tokenizer. Give tokenizer=... (an object, or the directory it "
                                 "was saved to with save_pretrained), or use a LightningModule with a .tokenizer "
                                 "(CausalLMModule loads the one saved with the model).")
            self._tokenizer = found
        self._tokenizer = load_tokenizer(self._tokenizer, "ChatDataModule")
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if self.train_source is None:
            raise ValueError("ChatDataModule: no training data. Give train=... (a JSONL file, a list of files, or a "
                             "list of records; on the command line --data.train FILE.jsonl).")
        tokenizer = self.tokenizer
        stats: dict[str, int] = {}
        train = read_records(self.train_source, "train")
        stats["records read"] = len(train)
        val = read_records(self.val_source, "val") if self.val_source is not None else None
        if self.deduplicate:
            texts = [_content(r) for r in train]
            exact = exact_duplicates(texts)
            near = near_duplicates(texts, self.near_duplicate_threshold, skip=exact) \
                if self.near_duplicate_threshold < 1 else []
            stats["exact duplicates dropped"], stats["near duplicates dropped"] = len(exact), len(near)
            gone = set(exact) | set(near)
            train = [r for i, r in enumerate(train) if i not in gone]
        stats.update(self._decontaminate(train, tokenizer))
        train = [r for i, r in enumerate(train) if i not in self._contaminated]
        if val is not None:
            val_out = self._decontaminate(val, tokenizer)
            val = [r for i, r in enumerate(val) if i not in self._contaminated]
            stats.update({f"val: {k}": v for k, v in val_out.items()})
        else:
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = round(self.val_fraction * len(train))
            val = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
        stats.update(self._decontaminate(train, tokenizer, {"the validation split": val} if val else {}))
        train = [r for i, r in enumerate(train) if i not in self._contaminated]
        self.train_records, self.val_records = train, val
        train_tok, counts = self._tokenize(train, tokenizer, "training")
        stats.update({f"train: {k}": v for k, v in counts.items()})
        val_tok, counts = self._tokenize(val, tokenizer, "validation")
        stats.update({f"val: {k}": v for k, v in counts.items()})
        if not train_tok:
            raise ValueError(f"ChatDataModule: no training example is left ({stats}). Check max_length / overflow "
                             f"(conversations longer than max_length={self.max_length} are dropped with "
                             f"overflow='drop'), and the duplicate and contamination counts.")
        stats["train examples"], stats["val examples"] = len(train_tok), len(val_tok)
        stats["train label tokens"] = sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in train_tok)
        self._unpacked_train = train_tok
        if self.packing:
            train_tok = pack_examples(train_tok, self.max_length)
            val_tok = pack_examples(val_tok, self.max_length) if val_tok else []
            stats["train packed rows"] = len(train_tok)
        self.train_dataset, self.val_dataset = TokenizedDataset(train_tok), TokenizedDataset(val_tok)
        self.stats = stats
        self._print_table()
        self._write_review()

    def _decontaminate(self, train: list, tokenizer, extra: Mapping[str, list] | None = None) -> dict[str, int]:
        """Drop (into ``self._contaminated``) the records of ``train`` that overlap an eval set (or
        ``extra``); the counts by set."""
        from ..callbacks.contamination_guard import find_contamination  # (callbacks import this package)

        self._contaminated: set[int] = set()
        sets: dict[str, Any] = {}
        if isinstance(self.eval_sets, Mapping):
            sets.update({str(k): v for k, v in self.eval_sets.items()})
        elif self.eval_sets is not None:
            sources = self.eval_sets if isinstance(self.eval_sets, (list, tuple)) and self.eval_sets \
                and all(isinstance(s, (str, os.PathLike)) for s in self.eval_sets) else [self.eval_sets]
            for k, s in enumerate(sources):
                sets[Path(s).stem if isinstance(s, (str, os.PathLike)) else f"eval set {k}"] = s
        out = {}
        if extra is None or not extra:
            comparisons = [(name, read_records(source, f"eval_sets[{name!r}]")) for name, source in sets.items()]
        else:
            comparisons = list(extra.items())
        for name, records in comparisons:
            report = find_contamination(train, records, self.ngram, tokenizer)
            new = set(report.train_indices) - self._contaminated
            self._contaminated |= new
            out[f"overlapping {name} (dropped)"] = len(new)
        return out

    def _tokenize(self, records: list, tokenizer, what: str) -> tuple[list[dict], dict[str, int]]:
        examples, dropped, long_kept, cut = [], 0, 0, 0
        for k, record in enumerate(records):
            try:
                example = tokenize_example(record, tokenizer, self.max_length, self.overflow)
            except (ValueError, TypeError) as err:
                shown = json.dumps(record, ensure_ascii=False)
                raise ValueError(f"ChatDataModule: {what} record {k} ({shown[:200]}{' ...' if len(shown) > 200 else ''}"
                                 f"): {err}") from None
            if example is None:
                dropped += 1
                continue
            if len(example["input_ids"]) > self.max_length:
                long_kept += 1
            elif self.overflow == "turns" and example_kind(record) == "chat":
                full = tokenize_example(record, tokenizer, None, "keep")
                cut += len(full["input_ids"]) > len(example["input_ids"])
            examples.append(example)
        counts = {f"longer than {self.max_length} tokens, dropped": dropped}
        if self.overflow == "keep":
            counts[f"longer than {self.max_length} tokens, kept whole"] = long_kept
        if self.overflow == "turns":
            counts["cut after the last whole reply that fits"] = cut
        return examples, counts

    # ------------------------------------------------------------------------------- reporting
    @rank_zero_only
    def _print_table(self) -> None:
        table = Table(title="ChatDataModule")
        table.add_column("step")
        table.add_column("examples", justify="right")
        for what, n in self.stats.items():
            table.add_row(what, f"{n:,}")
        Console().print(table)

    def _log_dir(self) -> Path | None:
        trainer = self.trainer
        if trainer is None:
            return None
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _write_review(self) -> None:
        if not self.review_examples or self.trainer is None or self.trainer.global_rank != 0:
            return
        directory = self._log_dir()
        directory.mkdir(parents=True, exist_ok=True)
        self.review_path = directory / self.review_file
        text = self.render_review(self.review_examples)
        atomic_write(self.review_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        rank_zero_info(f"ChatDataModule: wrote {min(self.review_examples, len(self._unpacked_train))} training "
                       f"examples to {self.review_path}: read them before training.")

    def render_review(self, n: int = 50) -> str:
        """Markdown: ``n`` training examples (seeded sample), decoded, trained spans between ⟦ and ⟧."""
        tokenizer, examples = self.tokenizer, self._unpacked_train
        order = sorted(random.Random(self.seed).sample(range(len(examples)), min(n, len(examples))))
        lines = [f"# {len(order)} training examples, as the model sees them", "",
                 f"Decoded token by token from the training data; the loss is taken on the text between {OPEN} and "
                 f"{CLOSE} (the assistant replies and their end-of-turn tokens), nowhere else. Check the template, "
                 f"the roles, where replies start and stop, and that nothing was cut off.", ""]
        for k in order:
            lines += [f"## example {k} ({len(examples[k]['input_ids'])} tokens)", "", "```text",
                      mark_trained(examples[k], tokenizer), "```", ""]
        return "\n".join(lines)

    # ----------------------------------------------------------------------------- dataloaders
    def _collator(self) -> ChatCollator:
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return ChatCollator(0 if pad is None else pad)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        collate = self._collator()
        if self.group_by_length and not self.packing:
            lengths = [len(e["input_ids"]) for e in self.train_dataset.examples]
            sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed)
            if self.trainer is not None:
                sampler.set_epoch(self.trainer.current_epoch)
            return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=collate,
                              num_workers=self.num_workers)
        import torch

        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, collate_fn=collate,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        if not len(self.val_dataset):
            return []
        return DataLoader(self.val_dataset, batch_size=self.batch_size, collate_fn=self._collator(),
                          num_workers=self.num_workers)


def mark_trained(example: Mapping[str, Sequence[int]], tokenizer) -> str:
    """The example decoded, every run of trained tokens (labels != -100) between ⟦ and ⟧."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    out, k = [], 0
    while k < len(ids):
        trained = labels[k] != IGNORE_INDEX
        j = k
        while j < len(ids) and (labels[j] != IGNORE_INDEX) == trained:
            j += 1
        text = tokenizer.decode(ids[k:j])
        out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
        k = j
    return "".join(out)
