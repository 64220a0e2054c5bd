"""The parts of a ``from_pretrained`` directory around the merged weights.

transformers, vLLM and TGI load a directory holding ``config.json`` (the architecture),
``generation_config.json``, the tokenizer's files and the weights: one ``model.safetensors``, or
shards ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` mapping each
tensor to its shard (``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``), as
``save_pretrained`` writes above ``max_shard_size``. Every safetensors file carries the metadata
``{"format": "pt"}``, which transformers checks.

:func:`lightning_peft.export_merged` writes all of these into a hidden sibling directory, then
swaps the whole directory into place (:func:`lightning_peft.atomic.atomic_directory`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
# what a tokenizer's save_pretrained may write (fast and slow tokenizers, chat templates)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``5_000_000`` or ``"5GB"`` / ``"500MB"`` / ``"2GiB"`` (transformers' spellings) as bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size}: give a positive number of bytes, or a size such as '5GB'.")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give bytes (an int) or a size such as '5GB', '500MB', '2GiB'.")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: the size must be positive.")
    return value


def shard(tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> list[dict[str, torch.Tensor]]:
    """Split ``tensors`` (in order) into shards of at most ``max_shard_size`` bytes each; a tensor
    larger than that gets a shard of its own (tensors are not split, as in transformers)."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> list[str]:
    """Write ``tensors`` into ``directory`` as one ``model.safetensors`` or as shards with an
    index; returns the file names written."""
    shards = shard(tensors, max_shard_size)
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, part in zip(names, shards):
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_NAME]


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a merged export, from ``model.safetensors`` or from the shards its index names."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / INDEX_NAME).is_file():
        index = json.loads((directory / INDEX_NAME).read_text())
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(directory / name)))
        return tensors
    return load_file(str(directory / WEIGHTS_NAME))


def _pretrained_config(model: nn.Module) -> Any:
    """``model.config`` when it is a transformers config (it has ``to_dict`` and a ``model_type``)."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_dict") and hasattr(config, "model_type") else None


def write_config(directory: Path, model: nn.Module, base: Path | None, dtype: torch.dtype) -> list[str]:
    """``config.json`` and ``generation_config.json``: from the live transformers model when it is
    one, else copied from the base directory. The dtype recorded is the export's; a quantization
    config (the export is float) is dropped. Returns the file names written."""
    written = []
    config = _pretrained_config(model)
    if config is not None:
        data = json.loads(config.to_json_string(use_diff=False))
    elif base is not None and (base / "config.json").is_file():
        data = json.loads((base / "config.json").read_text())
    else:
        data = None
    if data is not None:
        data.pop("quantization_config", None)
        data["dtype"] = str(dtype).removeprefix("torch.")
        data.pop("torch_dtype", None)
        (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        written.append("config.json")
    generation = getattr(model, "generation_config", None)
    if config is not None and hasattr(generation, "to_json_string"):
        (directory / "generation_config.json").write_text(generation.to_json_string(use_diff=True))
        written.append("generation_config.json")
    elif base is not None and (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", directory / "generation_config.json")
        written.append("generation_config.json")
    return written


def write_tokenizer(directory: Path, base: Path | None, tokenizer: Any = None) -> list[str]:
    """The tokenizer's files: ``tokenizer.save_pretrained`` when one is given, else those the base
    directory has. Returns the file names written."""
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):
            raise ValueError(f"tokenizer={type(tokenizer).__name__}: pass a transformers tokenizer (it has "
                             f"save_pretrained), or None to copy the tokenizer files of the base directory.")
        before = set(os.listdir(directory))
        tokenizer.save_pretrained(str(directory))
        return sorted(set(os.listdir(directory)) - before)
    if base is None:
        return []
    written = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, directory / name)
            written.append(name)
    return written


def base_directory(model: nn.Module, base: str | os.PathLike | None) -> Path | None:
    """The base model's local directory: ``base`` when given (it must exist), else the model's
    ``name_or_path`` when that is a local directory (``from_pretrained`` sets it), else None."""
    if base is not None:
        path = Path(base)
        if not path.is_dir():
            raise ValueError(f"base={str(base)!r} is not a directory; give the base model's local directory "
                             f"(config.json, tokenizer files), or None.")
        return path
    name = getattr(model, "name_or_path", None)
    if isinstance(name, str) and name and Path(name).is_dir():
        return Path(name)
    return None
