"""Every ```python block of README.md and docs/*.md runs, as written, in order.

One test per document (files whose names start with ``_`` are skipped). The blocks of a document
run one after the other in one namespace, fresh for each document, so a block may use what an
earlier block of the same page defined. The namespace starts with the PRELUDE below: the usual
imports (``torch``, ``L``, ``lp``, ``DataLoader``) and the placeholders the docs write for "your
model", "your data" and so on, each the smallest real thing of its kind. Only the names a page
uses are built.

While the blocks run:

- ``lightning.Trainer`` (so ``L.Trainer``) and ``lightning.pytorch.Trainer`` are a subclass whose
  ``__init__`` adds fast test settings (:data:`TRAINER_DEFAULTS`) to the page's own arguments
  (``strategy="qlora"``, ``callbacks=[...]`` are kept); ``max_steps`` is capped at 2.
- the working directory is the test's ``tmp_path``, so the files the docs write ("my-adapter",
  "merged", "adapters", "run.ckpt") land there.

Fences: ```python runs; ```python no-run is skipped (for a block that cannot run here; give the
reason in the text above it); ```text / ```bash / ```yaml are not Python (signatures, formulas,
messages, shell). Every fence must name its language (:func:`test_every_fence_names_its_language`).
The ```bash commands run elsewhere: ``examples/quickstart.py`` and the benchmark scripts in
``tests/test_examples.py``.
"""

from __future__ import annotations

import ast
import re
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, token_batch
from plain_module import CausalLM, sequences

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if not p.name.startswith("_"))]
LANGUAGES = {"python", "bash", "text", "yaml", "json", "toml"}
VOCAB = 128  # the prelude model's vocabulary; every token id below is under it

TRAINER_DEFAULTS = {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 2, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False}


# ------------------------------------------------------------------------------------ blocks
@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    language: str
    options: list[str]
    code: str

    @property
    def runs(self) -> bool:
        return self.language == "python" and "no-run" not in self.options


FENCE = re.compile(r"^(\s*)(`{3,})(.*)$")


def code_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        ticks = opening.group(2)
        info = opening.group(3).split()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        assert end < len(lines), f"{path.name}:{i + 1}: unclosed code fence"
        code = textwrap.dedent("\n".join(lines[i + 1:end]))
        blocks.append(Block(path, i + 2, info[0] if info else "", info[1:], code))
        i = end + 1
    return blocks


def names_used(blocks: list[Block]) -> set[str]:
    names = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.Name):
                names.add(node.id)
    return names


# ----------------------------------------------------------------------------------- prelude
def _my_module():
    """``MyModule``: a LightningModule that knows nothing of lightning_peft (tests/plain_module.py)."""
    return CausalLM


def _train_loader():
    """``train_loader``: 16 token sequences of 16, batches of 8 (two steps = one epoch)."""
    return sequences(n=16, seq=16, vocab=VOCAB, batch=8)


def _val_loader():
    """``val_loader``: 8 other sequences, one batch."""
    data = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    return torch.utils.data.DataLoader(list(data), batch_size=8)


def _pairs():
    """``pairs``: DPO preference pairs, lists of token ids (prompt 4, completions 3-4)."""
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()
    return [{"prompt": ids(4), "chosen": ids(4), "rejected": ids(3)} for _ in range(8)]


def _prompts():
    """``prompts``: 8 prompts of 4 token ids (1-D tensors: a DataLoader batches them to [4, 4])."""
    return list(torch.randint(1, VOCAB, (8, 4), generator=torch.Generator().manual_seed(4)))


def _reward_fn():
    """``reward_fn(prompts, completions) -> [G k]``: the share of completion tokens equal to 7."""
    return lambda prompts, completions: (completions == 7).float().mean(dim=1)


def _general_sequences():
    """``general_sequences``: a probe set for ForgettingProbe, 16 sequences of 16 tokens."""
    return list(torch.randint(0, VOCAB, (16, 16), generator=torch.Generator().manual_seed(5)))


def _train():
    """``train``: 20 training examples (token-id lists); train[3] holds 13 tokens of val[0],
    train[12] repeats train[5]."""
    g = torch.Generator().manual_seed(6)
    train = [torch.randint(0, VOCAB, (24,), generator=g).tolist() for _ in range(20)]
    train[3][5:18] = _val()[0][:13]
    train[12] = list(train[5])
    return train


def _val():
    """``val``: 4 evaluation examples (token-id lists)."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (20,), generator=g).tolist() for _ in range(4)]


CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [[{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}],
                 [{"role": "user", "content": "Name a red fruit."},
                  {"role": "assistant", "content": "A strawberry is a red fruit."}]]


def _tokenizer():
    """``tokenizer``: a ChatML tokenizer built here (byte-level BPE trained on a few sentences,
    <s> BOS, eos <|im_end|>, pad <pad>, a chat template; no download)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    corpus = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
                                   additional_special_tokens=["</s>", "<|im_start|>"], chat_template=CHATML)


def _chat_batch(tokenizer):
    """``chat_batch``: an SFT batch rendered with ``tokenizer``'s template, prompts masked (-100)."""
    rows = []
    for conversation in CONVERSATIONS:
        ids = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False).input_ids
        prompt = tokenizer(tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False).input_ids
        rows.append((ids, [-100] * len(prompt) + ids[len(prompt):]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])}


def _sft_adapter(tmp_path: Path) -> None:
    """The directory "sft-adapter": a saved LoRA adapter (r=8, all linear layers) for the prelude
    ``model``'s architecture, as an SFT run would leave it."""
    import lightning_peft as lp

    lp.save_adapter(lp.inject_adapters(tiny_llama(seed=1).cpu(), lp.LoraConfig(r=8, init_lora_weights=False)),
                    tmp_path / "sft-adapter")


# name -> (builder, names of the prelude values it takes)
PRELUDE: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "model": (lambda: tiny_llama(vocab=VOCAB).cpu(), ()),  # transformers LlamaForCausalLM (tests/conftest.py), eval mode
    "batch": (lambda: token_batch(vocab=VOCAB).cpu(), ()),  # input ids [2, 12]
    "MyModule": (_my_module, ()),
    "train_loader": (_train_loader, ()),
    "val_loader": (_val_loader, ()),
    "pairs": (_pairs, ()),
    "prompts": (_prompts, ()),
    "reward_fn": (_reward_fn, ()),
    "general_sequences": (_general_sequences, ()),
    "train": (_train, ()),
    "val": (_val, ()),
    "tokenizer": (_tokenizer, ()),
    "chat_batch": (_chat_batch, ("tokenizer",)),
}
FILES = {"sft-adapter": _sft_adapter}  # built in the working directory when a page names them


def prelude(names: set[str]) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_peft as lp

    namespace = {"__name__": "__docs__", "torch": torch, "L": L, "lp": lp, "DataLoader": DataLoader}
    built: dict = {}

    def build(name):
        if name not in built:
            builder, needs = PRELUDE[name]
            built[name] = builder(*(build(n) for n in needs))
        return built[name]

    for name in sorted(names & PRELUDE.keys()):
        namespace[name] = build(name)
    return namespace


# ------------------------------------------------------------------------------------- tests
def fast_trainer(tmp_path: Path, made: list):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class DocTrainer(L.Trainer):
        """The docs' Trainer with fast test settings; the page's own arguments win, but for
        ``max_steps``, capped at 2."""

        def __init__(self, *args, **kwargs):
            for key, value in TRAINER_DEFAULTS.items():
                kwargs.setdefault(key, value)
            if kwargs["max_steps"] < 0 or kwargs["max_steps"] > TRAINER_DEFAULTS["max_steps"]:
                kwargs["max_steps"] = TRAINER_DEFAULTS["max_steps"]
            kwargs.setdefault("default_root_dir", str(tmp_path))
            if not any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks") or []):
                kwargs.setdefault("enable_checkpointing", False)  # a ModelCheckpoint callback needs it on
            super().__init__(*args, **kwargs)
            made.append(self)

    return DocTrainer


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(doc: Path, tmp_path, monkeypatch):
    import lightning
    import lightning.pytorch

    blocks = [b for b in code_blocks(doc) if b.runs]
    if not blocks:
        return  # nothing in Python here (benchmarks.md: commands tests/test_examples.py runs)
    trainers: list = []
    trainer = fast_trainer(tmp_path, trainers)
    monkeypatch.setattr(lightning, "Trainer", trainer)
    monkeypatch.setattr(lightning.pytorch, "Trainer", trainer)
    monkeypatch.chdir(tmp_path)
    source = "\n".join(b.code for b in blocks)
    for name, make in FILES.items():
        if f'"{name}"' in source or f"'{name}'" in source:
            make(tmp_path)
    namespace = prelude(names_used(blocks))
    for block in blocks:
        # padded so that tracebacks name the doc's own lines (doc.md:LINE)
        code = compile("\n" * (block.line - 1) + block.code, str(doc), "exec")
        try:
            exec(code, namespace)  # noqa: S102 (the docs' own code)
        except Exception as error:  # noqa: BLE001 (any error fails): show the block and a plain traceback
            failure = "".join(traceback.format_exception(error)[2:])
        else:
            continue
        pytest.fail(f"{doc.name}, the block at line {block.line}:\n{textwrap.indent(block.code, '    ')}\n\n"
                    f"Traceback (most recent call last):\n{failure}", pytrace=False)
    for fitted in (t for t in trainers if t.state.fn == "fit"):  # each fit the page runs really trained
        assert fitted.state.finished and fitted.global_step > 0, (fitted.state, fitted.global_step)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_fence_names_its_language(doc: Path):
    unlabelled = [f"{doc.name}:{b.line - 1} ({b.language or 'no language'})" for b in code_blocks(doc)
                  if b.language not in LANGUAGES]
    assert not unlabelled, (f"fences without a known language: {unlabelled}; use ```python for code that runs "
                            f"(tests/test_docs.py runs it), ```text / ```bash / ```yaml for the rest")


def test_fences_are_read_as_documented(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n\n```python no-run\nraise SystemExit\n```\n"
                    "- item:\n\n  ```python\n  y = x\n  ```\n```text\nf(a, ...)\n```\n", encoding="utf-8")
    blocks = code_blocks(page)
    assert [(b.line, b.language, b.options, b.code, b.runs) for b in blocks] == [
        (3, "python", [], "x = 1", True), (7, "python", ["no-run"], "raise SystemExit", False),
        (12, "python", [], "y = x", True), (15, "text", [], "f(a, ...)", False)]
