r"""One example -> ``{"input_ids", "attention_mask", "labels"}``: chat conversations rendered with the
tokenizer's own chat template, prompt/completion pairs and plain text.

``labels`` follows the transformers convention: a copy of ``input_ids`` (the model shifts it by one
itself) with -100 where no loss is taken. For a conversation, the trained tokens are the assistant
replies and what the template writes to close them (the end-of-turn token, e.g. ``<|im_end|>`` or
``<|eot_id|>``, and its trailing newline): the model learns to answer and to stop. Everything else
(system and user turns, role headers, BOS) is -100.

Where the replies are, without searching for any English string:

- a template with ``{% generation %}`` markers: transformers' ``return_assistant_tokens_mask``
  (the template author's own statement of what is trained);
- any other template: by rendering message prefixes. For the ``i``-th message, an assistant reply,

      before = render(messages[:i], add_generation_prompt=True)   # ... + "<|im_start|>assistant\n"
      after  = render(messages[:i + 1])                           # ... + reply + "<|im_end|>\n"

  both must be prefixes of ``render(messages)``; the reply span is the characters
  ``[len(before), len(after))``, and a token is trained when it starts inside a span (character
  offsets of a fast tokenizer). A template that renders an earlier turn differently once more
  turns follow (e.g. one that strips reasoning from past replies) fails this check with an error
  that says so: add ``{% generation %}`` markers to it.

Too long (``max_length``): a reply is never cut silently. ``overflow`` chooses:
``"drop"`` (return ``None``; :class:`~lightning_peft.data.ChatDataModule` counts and reports them),
``"keep"`` (return the example whole, longer than ``max_length``), or ``"turns"`` (keep the
leading whole turns that fit, ending after an assistant reply; ``None`` if not even the first reply
fits). Plain text has no replies and is cut at ``max_length``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

IGNORE_INDEX = -100
OVERFLOW = ("drop", "keep", "turns")
ROLES = ("system", "user", "assistant", "tool")


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks the trained spans with ``{% generation %}``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and "generation" in template and "endgeneration" in template


def _check(messages: Any) -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise TypeError(f"tokenize_chat: messages must be a non-empty list of {{'role', 'content'}} dicts, got "
                        f"{type(messages).__name__}.")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TypeError(f"tokenize_chat: message {k} is {m!r}; each message is a dict with 'role' and 'content' "
                            f"(e.g. {{'role': 'user', 'content': 'Hi'}}).")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"tokenize_chat: the conversation has no assistant message (roles "
                         f"{[m['role'] for m in messages]}), so nothing would be trained.")
    return [dict(m) for m in messages]


def _render(tokenizer, messages, generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _no_template(tokenizer) -> ValueError:
    return ValueError(f"tokenize_chat: {type(tokenizer).__name__} has no chat_template. Give the tokenizer of the "
                      f"chat model you fine-tune, set tokenizer.chat_template, or use prompt/completion or text "
                      f"examples instead.")


def reply_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of each assistant reply
    (with what the template writes to close it), found by rendering message prefixes."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation=True) if i else ""
        after = _render(tokenizer, messages[:i + 1])
        if not (text.startswith(after) and after.startswith(before)):
            raise ValueError(f"tokenize_chat: this chat template does not render conversations as extensions of "
                             f"their prefixes (message {i}, an assistant reply, renders differently once more "
                             f"turns follow), so the reply spans cannot be found by rendering prefixes. Add "
                             f"{{% generation %}} ... {{% endgeneration %}} around the assistant content in the "
                             f"template (transformers' return_assistant_tokens_mask), or train on prompt/completion "
                             f"pairs.\n  prefix rendered: {after[-200:]!r}\n  whole rendered: {text[-200:]!r}")
        if len(after) > len(before):
            spans.append((len(before), len(after)))
    return text, spans


def tokenize_chat(messages: Sequence[Mapping[str, Any]], tokenizer, max_length: int | None = None,
                  overflow: str = "drop") -> dict[str, list[int]] | None:
    """Render one conversation with ``tokenizer``'s chat template and tokenize it; ``labels`` is -100
    everywhere but the assistant replies and their end-of-turn tokens (see the module docstring).

    Args:
        messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``, at least
            one assistant message.
        tokenizer: a transformers tokenizer with a ``chat_template`` (fast: offsets are needed
            unless the template has ``{% generation %}`` markers).
        max_length: the longest example in tokens; None: no limit.
        overflow: ``"drop"`` (return None), ``"keep"`` or ``"turns"`` for a conversation longer
            than ``max_length`` (module docstring).

    Returns ``{"input_ids", "attention_mask", "labels"}`` as lists of ints, or None when dropped.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"tokenize_chat(overflow={overflow!r}): choose one of {', '.join(map(repr, OVERFLOW))}.")
    messages = _check(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise _no_template(tokenizer)
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    else:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"tokenize_chat: {type(tokenizer).__name__} is a slow tokenizer; the reply spans are "
                             f"mapped to tokens by character offsets, which need a fast tokenizer "
                             f"(AutoTokenizer.from_pretrained(..., use_fast=True)), or {{% generation %}} markers "
                             f"in the chat template.")
        text, spans = reply_spans(messages, tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        s = 0
        for k, (start, end) in enumerate(enc["offset_mapping"]):
            while s < len(spans) and start >= spans[s][1]:
                s += 1
            if s == len(spans):
                break
            if spans[s][0] <= start < spans[s][1] and end > start:
                labels[k] = ids[k]
    if max_length is not None and len(ids) > max_length:
        if overflow == "drop":
            return None
        if overflow == "turns":
            cut = _last_reply_end(labels, max_length)
            if cut is None:
                return None
            ids, labels = ids[:cut], labels[:cut]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _last_reply_end(labels: list[int], max_length: int) -> int | None:
    """The end of the last trained run of ``labels`` that closes within ``max_length`` tokens."""
    cut = None
    for k in range(1, min(len(labels), max_length) + 1):
        if labels[k - 1] != IGNORE_INDEX and (k == len(labels) or labels[k] == IGNORE_INDEX):
            cut = k
    return cut


def tokenize_prompt_completion(prompt: str, completion: str, tokenizer, max_length: int | None = None,
                               overflow: str = "drop", chat: bool | None = None) -> dict[str, list[int]] | None:
    """A prompt/completion pair; only the completion (and the end-of-turn / EOS after it) is trained.

    ``chat``: render as ``[user: prompt, assistant: completion]`` with the chat template (default:
    when the tokenizer has one); else ``BOS? + prompt + completion + EOS``, tokenized as the tokenizer
    does for plain text, with the completion's tokens (and EOS) trained."""
    if overflow not in OVERFLOW:
        raise ValueError(f"tokenize_prompt_completion(overflow={overflow!r}): choose one of "
                         f"{', '.join(map(repr, OVERFLOW))}.")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise TypeError(f"tokenize_prompt_completion: prompt and completion must be strings, got "
                        f"{type(prompt).__name__} and {type(completion).__name__}.")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        return tokenize_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                             tokenizer, max_length, overflow)
    head = list(tokenizer(prompt)["input_ids"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if eos and head and head[-1] == eos[0]:  # a tokenizer that appends EOS to every text
        head = head[:-1]
    tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + eos
    ids, labels = head + tail, [IGNORE_INDEX] * len(head) + tail
    if max_length is not None and len(ids) > max_length and overflow != "keep":
        return None  # "turns": the one reply does not fit either
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_text(text: str, tokenizer, max_length: int | None = None) -> dict[str, list[int]]:
    """Plain text (continued pre-training): every token trained, EOS appended, cut at ``max_length``."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize_text: text must be a string, got {type(text).__name__}.")
    ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    if max_length is not None:
        ids = ids[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def example_kind(example: Any) -> str:
    """``"chat"``, ``"prompt_completion"`` or ``"text"``: which form a record has."""
    if isinstance(example, Mapping):
        if "messages" in example:
            return "chat"
        if "prompt" in example and "completion" in example:
            return "prompt_completion"
        if "text" in example:
            return "text"
    elif isinstance(example, Sequence) and not isinstance(example, (str, bytes)):
        return "chat"
    elif isinstance(example, str):
        return "text"
    keys = sorted(map(str, example)) if isinstance(example, Mapping) else type(example).__name__
    raise ValueError(f"An example must be {{'messages': [...]}}, {{'prompt': ..., 'completion': ...}} or "
                     f"{{'text': ...}} (or a list of messages, or a string); got {keys}.")


def tokenize_example(example: Any, tokenizer, max_length: int | None = None,
                     overflow: str = "drop") -> dict[str, list[int]] | None:
    """:func:`tokenize_chat`, :func:`tokenize_prompt_completion` or :func:`tokenize_text`, by the
    record's form (:func:`example_kind`)."""
    kind = example_kind(example)
    if kind == "chat":
        return tokenize_chat(example["messages"] if isinstance(example, Mapping) else example, tokenizer,
                             max_length, overflow)
    if kind == "prompt_completion":
        return tokenize_prompt_completion(example["prompt"], example["completion"], tokenizer, max_length, overflow)
    return tokenize_text(example["text"] if isinstance(example, Mapping) else example, tokenizer, max_length)


def message_texts(example: Any) -> list[str]:
    """The contents of an example (messages' contents; prompt and completion; the text): what is
    compared for duplicates and contamination, without any template."""
    kind = example_kind(example)
    if kind == "chat":
        messages = example["messages"] if isinstance(example, Mapping) else example
        return [str(m.get("content", "")) for m in messages]
    if kind == "prompt_completion":
        return [str(example["prompt"]), str(example["completion"])]
    return [example["text"] if isinstance(example, Mapping) else example]
