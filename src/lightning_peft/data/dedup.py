r"""Exact and near-duplicate removal over example contents (no template, no model).

- exact: the contents (message texts, or prompt and completion, or the text), lower-cased, with
  punctuation dropped and whitespace collapsed, hashed (blake2b); the first of each hash is kept;
- near: word 5-gram shingles, MinHash with 64 seeded permutations ``(a x + b) mod (2^61 - 1)`` of
  the shingles' 32-bit CRCs, LSH in 16 bands of 4 rows: examples sharing a band are candidates, and
  a candidate is a duplicate when the exact Jaccard similarity of the shingle sets reaches
  ``threshold`` (0.8). Earlier examples are kept, later ones dropped. Cost: linear in the text plus
  the candidate pairs (LSH keeps those few for dissimilar data).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence

import numpy as np

_PRIME = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower-cased words joined by single spaces (punctuation and whitespace differences vanish)."""
    return " ".join(_WORD.findall(text.lower()))


def exact_duplicates(texts: Sequence[str]) -> list[int]:
    """Indices of the texts whose normalized form equals an earlier one's."""
    seen, dropped = set(), []
    for i, text in enumerate(texts):
        key = hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()
        if key in seen:
            dropped.append(i)
        seen.add(key)
    return dropped


def _shingles(text: str, k: int) -> set[int]:
    words = normalize(text).split()
    if len(words) < k:
        return {zlib.crc32(" ".join(words).encode())} if words else set()
    return {zlib.crc32(" ".join(words[j:j + k]).encode()) for j in range(len(words) - k + 1)}


def near_duplicates(texts: Sequence[str], threshold: float = 0.8, shingle: int = 5, bands: int = 16, rows: int = 4,
                    seed: int = 0, skip: Sequence[int] = ()) -> list[int]:
    """Indices of texts whose word-shingle Jaccard similarity with an earlier kept text reaches
    ``threshold`` (MinHash LSH for candidates, exact Jaccard to confirm). ``skip``: indices left
    out (already dropped)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"near_duplicates(threshold={threshold!r}): give a Jaccard similarity in (0, 1].")
    rng = np.random.default_rng(seed)
    perms = bands * rows
    a = rng.integers(1, 1 << 29, perms, dtype=np.uint64)
    b = rng.integers(0, 1 << 29, perms, dtype=np.uint64)
    skipped = set(skip)
    shingles = [set() if i in skipped else _shingles(t, shingle) for i, t in enumerate(texts)]
    buckets: dict[tuple, list[int]] = {}
    dropped = []
    for i, sh in enumerate(shingles):
        if not sh:
            continue
        x = np.fromiter(sh, np.uint64, len(sh))
        signature = ((np.outer(a, x) + b[:, None]) % _PRIME).min(axis=1)
        keys = [(band, signature[band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = {j for key in keys for j in buckets.get(key, ())}
        if any(len(sh & shingles[j]) / len(sh | shingles[j]) >= threshold for j in candidates):
            dropped.append(i)
            continue
        for key in keys:
            buckets.setdefault(key, []).append(i)
    return dropped
