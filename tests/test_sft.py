"""Guards on templated chat data, with tokenizers built here: ChatTemplateGuard learns the markers
from a word-level tokenizer without English words and catches six planted faults; ContaminationGuard
finds no false positive among 500 clean templated conversations with a shared system prompt, finds
every planted leak, and drop mode keeps the rest (and refuses to drop nearly everything);
CausalLMModule's loss is token-weighted over gradient accumulation; guards and probes from YAML with
a tokenizer given by path; the CLI recipe end to end on a tiny local Llama and a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from chat_fixtures import bpe_tokenizer, conversations, word_tokenizer

import lightning_peft as lp
from lightning_peft.callbacks import ChatTemplateGuard, ContaminationGuard, find_contamination
from lightning_peft.data import ChatCollator, tokenize_chat

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "kaka zuzu momo riri tete lolo vexvex qiqi drazu nuka shomo pelri grite thalo"  # 14 words, shared


# ------------------------------------------------------------------------------ ChatTemplateGuard
EXPECTED = {"chatml": ("<s>", "<|im_start|> assistant", "<|im_end|>"),
            "llama3": ("<|begin_of_text|>", "<|start_header_id|> assistant <|end_header_id|>", "<|eot_id|>"),
            "zephyr": ("", "<|assistant|>", "</s>")}


def _batch(tokenizer, convs, **kw):
    return ChatCollator(tokenizer.pad_token_id)([tokenize_chat(c, tokenizer, **kw) for c in convs])


@pytest.mark.parametrize("style", list(EXPECTED))
def test_chat_template_guard_learns_markers_without_english_words(style):
    tokenizer = word_tokenizer(style)
    assert tokenizer("Hello, how are you?", add_special_tokens=False)["input_ids"].count(tokenizer.unk_token_id) == 4
    guard = ChatTemplateGuard(tokenizer)
    bos, header, end = EXPECTED[style]
    t = guard.template
    assert (tokenizer.decode(t.bos), tokenizer.decode(t.header), tokenizer.decode([t.end])) == (bos, header, end)
    guard.check_batch(_batch(tokenizer, conversations(4, seed=1, system=SYSTEM, turns=2)))
    # words the vocabulary lacks are the data's <unk>, not foreign markup, inside prompts and replies alike
    unknown = [{"role": "user", "content": "kaka Hello zuzu"}, {"role": "assistant", "content": "momo World"}]
    guard.check_batch(_batch(tokenizer, [unknown]))


def _faults(tokenizer):
    convs = conversations(3, seed=2, system=SYSTEM, turns=2)
    good = [tokenize_chat(c, tokenizer) for c in convs]
    collate = ChatCollator(tokenizer.pad_token_id)
    other = word_tokenizer("llama3")  # same vocabulary, another model's template
    e = dict(good[0])
    yield "another template", collate([tokenize_chat(convs[0], other)]), "not rendered with this"
    ids = [tokenizer.bos_token_id] + e["input_ids"]
    yield "double BOS", collate([{"input_ids": ids, "labels": [-100] + e["labels"]}]), "twice"
    yield "truncated", collate([{"input_ids": e["input_ids"][:-3], "labels": e["labels"][:-3]}]), "not closed"
    yield "shifted", collate([{"input_ids": e["input_ids"], "labels": e["labels"][1:] + [-100]}]), "shifted"
    masked = [-100 if t == tokenizer.eos_token_id else label for t, label in zip(e["input_ids"], e["labels"])]
    yield "end-of-turn masked", collate([{"input_ids": e["input_ids"], "labels": masked}]), "never learns to stop"
    yield "prompt trained", collate([{"input_ids": e["input_ids"], "labels": list(e["input_ids"])}]), "prompt tokens"


def test_chat_template_guard_catches_six_planted_faults_with_a_word_level_tokenizer():
    tokenizer = word_tokenizer("chatml")
    guard = ChatTemplateGuard(tokenizer)
    faults = list(_faults(tokenizer))
    assert len(faults) == 6
    for name, batch, message in faults:
        with pytest.raises(ValueError, match=message):
            guard.check_batch(batch)


def test_chat_template_guard_says_why_it_cannot_learn():
    tokenizer = word_tokenizer("chatml")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no markers at all
    with pytest.raises(ValueError, match="generation prompt is empty"):
        ChatTemplateGuard(tokenizer)


# ---------------------------------------------------------------------------- ContaminationGuard
def _templated(tokenizer, convs):
    return [tokenize_chat(c, tokenizer) for c in convs]


@pytest.mark.parametrize("with_tokenizer", [False, True], ids=["default", "tokenizer"])
def test_contamination_on_500_templated_conversations(with_tokenizer):
    tokenizer = bpe_tokenizer("chatml")
    train = conversations(500, seed=10, system=SYSTEM)
    evals = conversations(60, seed=11, system=SYSTEM)
    tok = tokenizer if with_tokenizer else None
    clean = find_contamination(_templated(tokenizer, train), _templated(tokenizer, evals), tokenizer=tok)
    assert clean.n_contaminated == 0 and clean.ignored_ngrams > 0  # the template and system prompt ignored
    leaked = list(train)
    planted = {37: evals[5], 120: evals[9], 301: evals[41], 499: evals[0]}
    for i, conversation in planted.items():
        leaked[i] = conversation
    leaked[200] = [leaked[200][0], evals[20][1], leaked[200][2]]  # only an eval question, with another reply
    report = find_contamination(_templated(tokenizer, leaked), _templated(tokenizer, evals), tokenizer=tok)
    assert report.train_indices == [37, 120, 200, 301, 499]
    # chat records are compared by their message contents
    records = find_contamination([{"messages": c} for c in leaked], [{"messages": c} for c in evals])
    assert records.train_indices == [37, 120, 200, 301, 499]


class _DictLM(L.LightningModule):
    def __init__(self, vocab):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def training_step(self, batch, batch_idx):
        logits = self.head(self.emb(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(guard, train, val):
    tokenizer = word_tokenizer()
    collate = ChatCollator(tokenizer.pad_token_id)
    trainer = L.Trainer(max_epochs=1, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                        limit_val_batches=1)
    loaders = [torch.utils.data.DataLoader(d, batch_size=16, shuffle=True, collate_fn=collate) for d in (train, val)]
    trainer.fit(_DictLM(len(tokenizer)), *loaders)
    return trainer


def test_contamination_guard_drop_keeps_the_rest_and_refuses_to_drop_nearly_everything():
    tokenizer = word_tokenizer()
    train = _templated(tokenizer, conversations(120, seed=12, system=SYSTEM))
    val = _templated(tokenizer, conversations(20, seed=13, system=SYSTEM))
    train[3], train[70] = val[2], val[11]
    guard = ContaminationGuard(on_hit="drop")
    trainer = _fit(guard, train, val)
    assert guard.report.train_indices == [3, 70] and len(trainer.train_dataloader.dataset) == 118
    # with the filter off, the shared system prompt matches everywhere: an error with the cause, not "training on 0"
    with pytest.raises(RuntimeError, match="max_drop"):
        _fit(ContaminationGuard(on_hit="drop", boilerplate=1), train, val)


# ------------------------------------------------------------------------ token-weighted loss
def _tiny_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                        max_position_embeddings=256))


class _Grads(lp.CausalLMModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def test_loss_is_token_weighted_over_gradient_accumulation():
    tokenizer = word_tokenizer()
    collate = ChatCollator(tokenizer.pad_token_id)
    short = [tokenize_chat(c, tokenizer) for c in conversations(2, seed=20)]
    long = [tokenize_chat(c, tokenizer) for c in conversations(2, seed=21, turns=4)]
    batches = [collate(short), collate(long)]
    module = _Grads(_tiny_llama(len(tokenizer)))
    reference = _tiny_llama(len(tokenizer))
    total = sum(lp.causal_lm.token_loss_sum(reference(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
                                            b["labels"])[0] for b in batches)
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    (total / tokens).backward()
    assert int((batches[0]["labels"] != -100).sum()) * 2 < tokens  # the micro-batches differ in size
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(module.grads[f"model.{name}"], p.grad, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ YAML and the CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama and its word-level ChatML tokenizer saved to one directory, and chat JSONL files."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer = word_tokenizer()
    _tiny_llama(len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "chat.jsonl").write_text("\n".join(json.dumps({"messages": c})
                                               for c in conversations(80, seed=30, system=SYSTEM)) + "\n")
    (root / "probe.jsonl").write_text("\n".join(json.dumps({"text": " ".join(m["content"] for m in c)})
                                                for c in conversations(8, seed=31)) + "\n")
    return root


def test_guards_and_probes_from_yaml_with_a_tokenizer_path(saved):
    from jsonargparse import ArgumentParser

    from lightning_peft.callbacks import ForgettingProbe, ReviewSamples

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[L.Callback])
    base = str(saved / "base")
    config = [{"class_path": "lightning_peft.callbacks.ChatTemplateGuard", "init_args": {"tokenizer": base}},
              {"class_path": "lightning_peft.callbacks.ContaminationGuard",
               "init_args": {"tokenizer": base, "on_hit": "drop", "boilerplate": 0.1}},
              {"class_path": "lightning_peft.callbacks.ForgettingProbe",
               "init_args": {"dataloader": str(saved / "probe.jsonl"), "tokenizer": base}},
              {"class_path": "lightning_peft.callbacks.ReviewSamples",
               "init_args": {"prompts": ["kaka zuzu"], "tokenizer": base}}]
    callbacks = parser.instantiate_classes(parser.parse_object({"callbacks": config})).callbacks
    template, contamination, probe, review = callbacks
    assert template.tokenizer.decode([template.template.end]) == "<|im_end|>"
    assert contamination.tokenizer.chat_template and contamination.boilerplate == 0.1
    assert isinstance(probe, ForgettingProbe) and isinstance(review, ReviewSamples)
    loader = probe._load(probe.dataloader, None)
    assert next(iter(loader))["input_ids"].shape[0] == 8
    with pytest.raises(ValueError, match="not a directory"):
        ChatTemplateGuard(tokenizer=str(saved / "nowhere"))


def test_cli_recipe_end_to_end_on_a_tiny_llama_and_a_jsonl_file(saved, tmp_path, monkeypatch, capsys):
    from lightning_peft.cli import main

    monkeypatch.chdir(tmp_path)  # adapters/ and lightning_logs/ go here
    code = main(["fit", "--config", str(ROOT / "examples" / "configs" / "qlora.yaml"), "--model.base",
                 str(saved / "base"), "--data.train", str(saved / "chat.jsonl"), "--trainer.max_steps=2",
                 "--trainer.accumulate_grad_batches=2", "--trainer.precision=32-true", "--data.batch_size=4",
                 "--data.review_examples=5", "--trainer.enable_progress_bar=false"])
    assert code == 0
    assert "records read" in capsys.readouterr().out  # the ChatDataModule table
    last = tmp_path / "adapters" / "last"
    state = torch.load(last / "training_state.ckpt", weights_only=True)
    assert state["global_step"] == 2 and state["lightning_peft"]["quantization"]["quant_type"] == "nf4"
    review = next(tmp_path.rglob("sft_review.md")).read_text()
    assert review.count("## example") == 5 and "<|im_end|>⟧" in review
