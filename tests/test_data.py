"""lightning_peft.data: chat rendering with the tokenizer's own template and assistant-only labels
(word-level and BPE tokenizers built here; ChatML, Llama-3, Zephyr, Mistral templates and ChatML with
{% generation %} markers), truncation, packing (per-example loss equal to unpacked on a tiny Llama),
length-grouped batches, and ChatDataModule (dedup, split, decontamination, review file)."""

from __future__ import annotations

import json

import pytest
import torch
from chat_fixtures import TEMPLATES, bpe_tokenizer, conversations, word_tokenizer

from lightning_peft.data import (ChatCollator, ChatDataModule, LengthGroupedSampler, near_duplicates, pack_examples,
                                 tokenize_chat, tokenize_prompt_completion, tokenize_text)

STYLES = list(TEMPLATES)


def trained_runs(example) -> list[list[int]]:
    ids, labels, runs, k = example["input_ids"], example["labels"], [], 0
    while k < len(ids):
        if labels[k] == -100:
            k += 1
            continue
        j = k
        while j < len(ids) and labels[j] != -100:
            j += 1
        runs.append(ids[k:j])
        k = j
    return runs


@pytest.mark.parametrize("make", [word_tokenizer, bpe_tokenizer], ids=["word", "bpe"])
@pytest.mark.parametrize("style", STYLES)
def test_labels_cover_exactly_the_replies_and_their_end_of_turn(style, make):
    tokenizer = make(style)
    end = tokenizer.eos_token_id
    for conversation in conversations(3, seed=1, system="kaka zuzu", turns=2):
        example = tokenize_chat(conversation, tokenizer)
        assert example["labels"] != example["input_ids"]
        assert all(label in (-100, token) for label, token in zip(example["labels"], example["input_ids"]))
        replies = [m["content"] for m in conversation if m["role"] == "assistant"]
        runs = trained_runs(example)
        assert len(runs) == len(replies)
        for run, reply in zip(runs, replies):
            content = tokenizer(reply, add_special_tokens=False)["input_ids"]
            assert run[:len(content)] == content  # the reply, from its first token
            assert run[len(content)] == end  # then the end-of-turn token
            assert tokenizer.decode(run[len(content) + 1:]).strip() == ""  # then only the template's newline
        # the text rendered is the template's, tokenized without extra special tokens
        assert tokenizer.decode(example["input_ids"]) == tokenizer.decode(
            tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False),
                      add_special_tokens=False)["input_ids"])


def test_generation_markers_agree_with_prefix_rendering():
    for make in (word_tokenizer, bpe_tokenizer):
        marked, plain = make("chatml_generation"), make("chatml")
        for conversation in conversations(4, seed=2, turns=2):
            assert tokenize_chat(conversation, marked) == tokenize_chat(conversation, plain)


def test_a_template_that_rewrites_past_turns_is_refused_with_the_reason():
    tokenizer = word_tokenizer()
    # drops earlier assistant replies once a later one exists (as reasoning-stripping templates do)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                               "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    conversation = conversations(1, turns=2)[0] + [{"role": "user", "content": "kaka"}]
    with pytest.raises(ValueError, match="generation"):
        tokenize_chat(conversation, tokenizer)
    with pytest.raises(ValueError, match="no chat_template"):
        tokenizer.chat_template = None
        tokenize_chat(conversation, tokenizer)
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_chat([{"role": "user", "content": "kaka"}], word_tokenizer())


def test_truncation_drops_keeps_or_cuts_at_a_reply_never_inside_one():
    tokenizer = word_tokenizer()
    conversation = conversations(1, seed=3, turns=3)[0]
    full = tokenize_chat(conversation, tokenizer)
    n = len(full["input_ids"])
    assert tokenize_chat(conversation, tokenizer, max_length=n) == full
    assert tokenize_chat(conversation, tokenizer, max_length=n - 1) is None  # "drop"
    assert tokenize_chat(conversation, tokenizer, max_length=n - 1, overflow="keep") == full
    cut = tokenize_chat(conversation, tokenizer, max_length=n - 1, overflow="turns")
    assert len(cut["input_ids"]) < n - 1 and len(trained_runs(cut)) == 2  # the third reply went whole
    assert full["input_ids"][:len(cut["input_ids"])] == cut["input_ids"]
    assert cut["labels"][-1] == tokenizer.eos_token_id  # it ends on an end-of-turn token
    assert tokenize_chat(conversation, tokenizer, max_length=5, overflow="turns") is None


def test_prompt_completion_and_text():
    tokenizer = bpe_tokenizer()
    pair = tokenize_prompt_completion("kaka zuzu", "momo riri", tokenizer)  # chat template: user / assistant
    assert pair == tokenize_chat([{"role": "user", "content": "kaka zuzu"},
                                  {"role": "assistant", "content": "momo riri"}], tokenizer)
    plain = tokenize_prompt_completion("kaka zuzu", " momo riri", tokenizer, chat=False)
    completion = tokenizer(" momo riri", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert trained_runs(plain) == [completion] and plain["input_ids"][-len(completion):] == completion
    text = tokenize_text("kaka zuzu momo", tokenizer, max_length=3)
    assert text["labels"] == text["input_ids"] and len(text["input_ids"]) == 3


def _tiny_llama(vocab: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def _per_token_losses(model, batch) -> torch.Tensor:
    """CE of every position's label (shifted), -100 -> 0; [batch, seq]."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.double()
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_each_example_its_unpacked_loss(attn):
    tokenizer = word_tokenizer()
    examples = [tokenize_chat(c, tokenizer) for c in conversations(7, seed=4, system="kaka zuzu", turns=2)]
    model = _tiny_llama(len(tokenizer), attn)
    collate = ChatCollator(tokenizer.pad_token_id)
    unpacked = _per_token_losses(model, collate(examples)).sum(1)
    rows = pack_examples(examples, max_length=128)
    assert len(rows) < len(examples) and sorted(i for r in rows for i in r["example_indices"]) == list(range(7))
    batch = collate(rows)
    assert "attention_mask" not in batch and "position_ids" in batch
    losses = _per_token_losses(model, batch)
    for r, row in enumerate(rows):
        start = 0
        for i, n in zip(row["example_indices"], row["seq_lens"]):
            assert losses[r, start:start + n].sum().item() == pytest.approx(unpacked[i].item(), rel=1e-5)
            start += n
    # the same rows with an attention mask attend across examples: packing is then not exact
    masked = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    assert not torch.allclose(_per_token_losses(model, masked), losses, rtol=1e-3)


def test_length_grouped_batches_cover_everything_once_with_less_padding():
    lengths = [int(x) for x in torch.randint(5, 500, (400,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedSampler(lengths, batch_size=8, mega=10, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(400)) and len(batches) == len(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    random_batches = [list(range(k, k + 8)) for k in range(0, 400, 8)]
    assert padding(batches) < padding(random_batches) / 4


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_chat_datamodule_dedups_splits_decontaminates_and_writes_the_review(tmp_path):
    tokenizer = word_tokenizer()
    convs = conversations(120, seed=5, system="kaka zuzu momo riri tete lolo vexvex qiqi", turns=1)
    evals = conversations(10, seed=6, system="kaka zuzu momo riri tete lolo vexvex qiqi")
    records = [{"messages": c} for c in convs]
    records.append({"messages": convs[3]})  # exact copy
    near = [dict(m) for m in convs[4]]
    near[2] = {"role": "assistant", "content": convs[4][2]["content"].rsplit(" ", 1)[0] + " kaka"}  # last word
    records.append({"messages": near})
    leaks = [{"messages": evals[k]} for k in (0, 4, 7)]  # three eval conversations leaked into the training data
    records += leaks
    records.append({"prompt": "kaka zuzu", "completion": "momo riri"})
    records.append({"messages": conversations(1, seed=7, turns=30)[0]})  # too long
    train = _write_jsonl(tmp_path / "train.jsonl", records)
    dm = ChatDataModule(train, tokenizer=tokenizer, eval_sets={"bench": [{"messages": e} for e in evals]},
                        val_fraction=0.1, max_length=200, batch_size=4, ngram=8)
    dm.setup("fit")
    s = dm.stats
    assert s["records read"] == 127 and s["exact duplicates dropped"] == 1 and s["near duplicates dropped"] == 1
    assert s["overlapping bench (dropped)"] == 3
    assert s["train: longer than 200 tokens, dropped"] + s["val: longer than 200 tokens, dropped"] == 1
    assert s["train examples"] + s["val examples"] == 127 - 2 - 3 - 1
    assert not any(r in leaks for r in dm.train_records)
    assert ChatDataModule(train, tokenizer=tokenizer, val_fraction=0.1).setup() is None  # seeded: the same split
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    review = dm.render_review(50)
    assert review.count("## example") == 50 and "⟦" in review
    assert "⟦momo riri <|im_end|>⟧" in dm.render_review(200)


def test_chat_datamodule_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "kaka"}, {"role": "assistant", "content": "zu"}]}\n'
                   '{"question": "kaka"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'messages'"):
        ChatDataModule(bad, tokenizer=word_tokenizer()).setup()
    with pytest.raises(ValueError, match="does not exist"):
        ChatDataModule(tmp_path / "missing.jsonl", tokenizer=word_tokenizer()).setup()
    with pytest.raises(ValueError, match="not a directory"):
        ChatDataModule(bad, tokenizer=str(tmp_path / "nope")).setup()


def test_near_duplicates_by_shingle_jaccard():
    base = "kaka zuzu momo riri tete lolo vexvex qiqi drazu nuka shomo pelri grite thalo wovex ybqi"
    texts = [base, base + " kaka", "momo " * 16, base.replace("qiqi", "kazu")]
    assert near_duplicates(texts, threshold=0.8) == [1]  # one word more: Jaccard 12/13; a word replaced: 7/17
