"""Data for supervised fine-tuning: chat conversations rendered with the tokenizer's own template,
loss on the assistant replies only, packing, length-grouped batches, and ``ChatDataModule`` (JSONL ->
deduplicated, decontaminated batches). See docs/sft.md."""

from .batching import ChatCollator, LengthGroupedSampler, pack_examples
from .dedup import exact_duplicates, near_duplicates
from .module import ChatDataModule, TokenizedDataset, mark_trained, read_records
from .tokenize import (IGNORE_INDEX, example_kind, has_generation_markers, message_texts, reply_spans, tokenize_chat,
                       tokenize_example, tokenize_prompt_completion, tokenize_text)
from .tokenizer import load_tokenizer

__all__ = ["IGNORE_INDEX", "ChatCollator", "ChatDataModule", "LengthGroupedSampler", "TokenizedDataset",
           "exact_duplicates", "example_kind", "has_generation_markers", "load_tokenizer", "mark_trained",
           "message_texts", "near_duplicates", "pack_examples", "read_records", "reply_spans", "tokenize_chat",
           "tokenize_example", "tokenize_prompt_completion", "tokenize_text"]
