"""Tokenizers and chat templates built here (no downloads) for the SFT data and guard tests.

- ``word_tokenizer``: word-level over invented words only (no English word in it but the role
  names the templates write), so a probe in English tokenizes to ``<unk>``;
- ``bpe_tokenizer``: byte-level BPE trained on the fly on the conversations;
- templates written in the formats of ChatML, Llama-3, Zephyr and Mistral ``[INST]``, and ChatML
  with ``{% generation %}`` markers.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_GENERATION = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
TEMPLATES = {"chatml": (CHATML, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>"), "zephyr": (ZEPHYR, "</s>"),
             "mistral": (MISTRAL, "</s>"), "chatml_generation": (CHATML_GENERATION, "<|im_end|>")}
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>",
            "[INST]", "[/INST]"]
ROLES = ["system", "user", "assistant"]
SYLLABLES = ["ka", "zu", "mo", "ri", "te", "lo", "vex", "qi", "dra", "nu", "sho", "pel", "gri", "tha", "wo", "yb"]
WORDS = sorted({a + b for a in SYLLABLES for b in SYLLABLES})  # 256 invented words


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def conversations(n: int, seed: int = 0, system: str | None = None, turns: int = 1) -> list[list[dict]]:
    """``n`` random conversations of invented words (optionally a shared system prompt)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": system}] if system else []
        for _ in range(turns):
            messages += [{"role": "user", "content": words(rng, rng.randint(4, 12))},
                         {"role": "assistant", "content": words(rng, rng.randint(3, 10))}]
        out.append(messages)
    return out


def _wrap(tok: Tokenizer, template: str, eos: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=[t for t in SPECIALS[2:] if t != eos],
                                   chat_template=template)


def word_tokenizer(style: str = "chatml") -> PreTrainedTokenizerFast:
    """Word-level: the invented words, the role names and punctuation; anything else is <unk>."""
    template, eos = TEMPLATES[style]
    vocab = {t: i for i, t in enumerate(SPECIALS + ROLES + WORDS + [".", ",", "?", "!", "|"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return _wrap(tok, template, eos)


def bpe_tokenizer(style: str = "chatml", corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained here on invented words (and ``corpus``)."""
    template, eos = TEMPLATES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [m["content"] for c in conversations(200, seed=99, system="pel dra") for m in c] + ROLES + (corpus or [])
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(tok, template, eos)
