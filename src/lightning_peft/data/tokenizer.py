"""A tokenizer given as an object or as a path (a YAML config can only give a path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_tokenizer(tokenizer: Any, who: str = "lightning_peft") -> Any:
    """``tokenizer`` itself, or, for a path (str / ``os.PathLike``), the transformers tokenizer saved
    there with ``save_pretrained`` (``AutoTokenizer.from_pretrained(path, local_files_only=True)``)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_dir():
        raise ValueError(f"{who}: tokenizer={str(tokenizer)!r} is not a directory. Give the directory a tokenizer "
                         f"was saved to with tokenizer.save_pretrained(DIR) (a model directory usually holds one), "
                         f"or a tokenizer object.")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(f"{who}: loading a tokenizer from {path} needs transformers: pip install transformers") \
            from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{who}: could not load a tokenizer from {path} ({str(err).splitlines()[0]}). The directory "
                         f"must hold the files of tokenizer.save_pretrained (tokenizer.json / tokenizer_config.json).") \
            from None
