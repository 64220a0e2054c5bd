"""ChatTemplateGuard on a ChatML tokenizer built here (byte-level BPE trained on a few sentences; no
downloads): correct batches pass; each classic mistake raises with the sample decoded and the fix.
Llama-3, Gemma and Zephyr-style templates on the same vocabulary are learned and checked too."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lightning_peft.callbacks.chat_template_guard import ChatTemplateGuard

CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Name a red fruit."},
     {"role": "assistant", "content": "A strawberry is a red fruit."}],
    [{"role": "user", "content": "Say hello."},
     {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "And goodbye?"},
     {"role": "assistant", "content": "Goodbye, see you soon."}],
]


# other styles: template, eos, and the BOS / header / end-of-turn / rest the guard must learn
STYLES = {
    "llama3": ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
               "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
               "<|eot_id|>",
               ("<|begin_of_text|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "")),
    "gemma": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
              "<end_of_turn>", ("<s>", "<start_of_turn>model\n", "<end_of_turn>", "\n")),
    "zephyr": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
               "</s>", ("", "<|assistant|>\n", "</s>", "\n")),
}
MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
           "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>"]


def chatml_tokenizer(template: str = CHATML, eos: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    """ChatML like Qwen2's (eos = <|im_end|>) plus <s> as BOS, which the tokenizer also adds to plain text
    (as Llama's does) and the template writes itself; </s> exists but the template never writes it.
    ``template``/``eos``: another style, with the same vocabulary (the markers of STYLES included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *MARKERS]
    corpus = [m["content"] for conversation in CONVERSATIONS for m in conversation] + ["system user assistant"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                   additional_special_tokens=[t for t in specials[2:] if t != eos],
                                   chat_template=template)


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer()


def encode(tokenizer, text: str, bos: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=bos)["input_ids"]


def sft_sample(tokenizer, conversation) -> tuple[list[int], list[int]]:
    """The usual SFT recipe: render, tokenize, mask the prompt (everything before the last reply)."""
    ids = encode(tokenizer, tokenizer.apply_chat_template(conversation, tokenize=False))
    prompt = encode(tokenizer, tokenizer.apply_chat_template(conversation[:-1], tokenize=False,
                                                             add_generation_prompt=True))
    assert ids[:len(prompt)] == prompt
    return ids, [-100] * len(prompt) + ids[len(prompt):]


def collate(tokenizer, samples, mask_pad_by_id: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad with the tokenizer's pad token; labels -100 on padding (and, the naive way, on every
    token equal to the pad id)."""
    width = max(len(ids) for ids, _ in samples)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in samples])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in samples])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in samples])
    if mask_pad_by_id:
        labels[input_ids == pad] = -100
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def good_batch(tokenizer) -> dict[str, torch.Tensor]:
    return collate(tokenizer, [sft_sample(tokenizer, c) for c in CONVERSATIONS])


def test_learns_the_chatml_structure(tokenizer):
    t = ChatTemplateGuard(tokenizer).template
    assert tokenizer.decode(t.bos) == "<s>"
    assert tokenizer.decode(t.header) == "<|im_start|>assistant\n"
    assert tokenizer.convert_ids_to_tokens(t.end) == "<|im_end|>"
    assert tokenizer.decode(t.rest) == "\n"
    assert {tokenizer.convert_ids_to_tokens(i) for i in t.specials} == {"<s>", "<|im_start|>", "<|im_end|>"}


def test_correct_batch_passes(tokenizer):
    ChatTemplateGuard(tokenizer).check_batch(good_batch(tokenizer))
    # training on every reply (not only the last) and leaving "\n" after <|im_end|> masked pass too
    ids = encode(tokenizer, tokenizer.apply_chat_template(CONVERSATIONS[2], tokenize=False))
    guard = ChatTemplateGuard(tokenizer)
    t = guard.template
    labels = [-100] * len(ids)
    for start in (k + len(t.header) for k in range(len(ids)) if tuple(ids[k:k + len(t.header)]) == t.header):
        close = ids.index(t.end, start)
        labels[start:close + 1] = ids[start:close + 1]
    guard.check_batch(collate(tokenizer, [(ids, labels)]))


def without_template(tokenizer):
    text = "User: What is the capital of France?\nAssistant: The capital of France is Paris.</s>"
    ids = encode(tokenizer, text, bos=True)
    return collate(tokenizer, [sft_sample(tokenizer, CONVERSATIONS[0]), (ids, list(ids))])


def unmasked_prompt(tokenizer):
    ids, _ = sft_sample(tokenizer, CONVERSATIONS[1])
    return collate(tokenizer, [(ids, list(ids))])


def double_bos(tokenizer):
    ids = encode(tokenizer, tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False), bos=True)
    return collate(tokenizer, [(ids, [-100] * 20 + ids[20:])])


def truncated(tokenizer):
    ids, labels = sft_sample(tokenizer, CONVERSATIONS[0])
    return collate(tokenizer, [(ids[:-4], labels[:-4])])


def shifted_labels(tokenizer):
    ids, labels = sft_sample(tokenizer, CONVERSATIONS[0])
    return collate(tokenizer, [(ids, labels[1:] + [-100])])


def eos_appended(tokenizer):
    ids, labels = sft_sample(tokenizer, CONVERSATIONS[0])
    eos = tokenizer.convert_tokens_to_ids("</s>")
    return collate(tokenizer, [(ids + [eos], labels + [eos])])


@pytest.mark.parametrize("build, problem, shown, fix", [
    (without_template, "assistant header '<|im_start|>assistant\\n' never occurs",
     "User: What is the capital of France?", "apply_chat_template"),
    (unmasked_prompt, "prompt tokens are trained", "You are a helpful assistant.",
     "set labels to -100 on the system/user"),
    (double_bos, "starts with '<s>' twice", "<s><s><|im_start|>user", "add_special_tokens=False"),
    (truncated, "not closed by '<|im_end|>'", "The capital of France is", "drop the samples longer"),
    (shifted_labels, "labels differ from input_ids", "Paris.<|im_end|>", "the model shifts them itself"),
    (eos_appended, "'</s>', special tokens this chat template never writes", "Paris.<|im_end|>\n</s>",
     "apply_chat_template"),
], ids=["without_template", "unmasked_prompt", "double_bos", "truncated", "shifted_labels", "foreign_eos"])
def test_each_mistake_raises_with_the_decoded_sample_and_the_fix(tokenizer, build, problem, shown, fix):
    with pytest.raises(ValueError) as error:
        ChatTemplateGuard(tokenizer).check_batch(build(tokenizer), batch_idx=3)
    message = str(error.value)
    assert "training batch 3" in message
    assert problem in message
    sample = next(line for line in message.splitlines() if line.startswith("  sample: "))
    assert repr(shown)[1:-1] in sample  # the offending sample, decoded, special tokens shown
    fix_line = next(line for line in message.splitlines() if line.startswith("  fix: "))
    assert fix in fix_line


def test_pad_equal_eos_masks_the_end_of_turn_and_raises():
    trap = chatml_tokenizer()
    trap.pad_token = trap.eos_token  # the classic setup for a tokenizer without a pad token
    batch = collate(trap, [sft_sample(trap, c) for c in CONVERSATIONS], mask_pad_by_id=True)
    with pytest.raises(ValueError) as error:
        ChatTemplateGuard(trap).check_batch(batch)
    message = str(error.value)
    assert "labels mask the end-of-turn token '<|im_end|>' of a trained reply: the model never learns to stop" \
        in message
    assert "pad_token is '<|im_end|>'" in message and "distinct pad token" in message
    assert "The capital of France is Paris.<|im_end|>" in message
    # the fix: a distinct pad token; the same naive collator then masks padding only
    fixed = chatml_tokenizer()
    ChatTemplateGuard(fixed).check_batch(collate(fixed, [sft_sample(fixed, c) for c in CONVERSATIONS],
                                                 mask_pad_by_id=True))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_other_template_styles_are_learned_and_checked(style):
    template, eos, learned = STYLES[style]
    tokenizer = chatml_tokenizer(template, eos)
    guard = ChatTemplateGuard(tokenizer)
    t = guard.template
    assert (tokenizer.decode(t.bos), tokenizer.decode(t.header), tokenizer.convert_ids_to_tokens(t.end),
            tokenizer.decode(t.rest)) == learned
    conversations = CONVERSATIONS if style != "gemma" else [CONVERSATIONS[0], CONVERSATIONS[2]]  # no system role
    samples = [sft_sample(tokenizer, c) for c in conversations]
    guard.check_batch(collate(tokenizer, samples))
    with pytest.raises(ValueError, match="prompt tokens are trained"):
        guard.check_batch(collate(tokenizer, [(ids, list(ids)) for ids, _ in samples]))


def test_template_without_generation_prompt_is_refused():
    mistral = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
               "' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="generation prompt is empty.*'\\[INST\\]' style are not supported"):
        ChatTemplateGuard(chatml_tokenizer(mistral, "</s>"))


class Recorder(L.LightningModule):
    """Just enough of a module to run training steps on dict batches."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return (self.weight - batch["labels"].clamp_min(0).float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tokenizer, batches, check_batches=2):
    module, guard = Recorder(), ChatTemplateGuard(tokenizer, check_batches=check_batches)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[guard])
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module, guard


def test_through_a_trainer_checks_the_first_batches_only(tokenizer):
    good, bad = good_batch(tokenizer), unmasked_prompt(tokenizer)
    module, guard = _fit(tokenizer, [good, good, bad])  # the third batch is past check_batches=2
    assert module.steps == 3 and guard._checked == 2
    with pytest.raises(ValueError, match=r"training batch 1, sample 0: \d+ prompt tokens are trained"):
        _fit(tokenizer, [good, bad, good])


def test_configuration_and_batch_format_errors(tokenizer):
    plain = chatml_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        ChatTemplateGuard(plain)
    with pytest.raises(ValueError, match="check_batches=0"):
        ChatTemplateGuard(tokenizer, check_batches=0)
    with pytest.raises(TypeError, match="dicts with 'input_ids' and 'labels'"):
        ChatTemplateGuard(tokenizer).check_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
