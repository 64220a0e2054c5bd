"""Adapter files in the HF PEFT on-disk format, safetensors only, written atomically.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Keys are PEFT's:
``base_model.model.<module path>.lora_A.weight``, ``...lora_B.weight``,
``...lora_magnitude_vector`` (DoRA), ``...lora_embedding_A`` / ``_B`` (embeddings), ``...ia3_l``
((IA)^3), ``prompt_embeddings`` (prompt and prefix tuning: no module path), and the module's own
keys for ``modules_to_save`` copies and trained biases; the adapter name is not in the file.
Both libraries read each other's directories. BitFit (``...bitfit_bias``) and bottleneck adapters
(``...adapter_down.weight`` etc.) have no PEFT counterpart: their keys are ours, same layout.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write
from .config import AdapterConfig, config_from_dict
from .methods import AdapterModule
from .inject import _inject, adapter_configs, adapter_modules, adapter_owner, adapter_parameters, delete_adapter, set_adapter
from .quantize import quant_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."
TRAINING_STATE = "training_state.ckpt"  # beside the adapter files in an AdapterCheckpoint save
CHECKPOINT_KEY = "lightning_peft"  # the entry of a Lightning checkpoint that holds checkpoint_meta


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``{key in the PEFT file: live tensor}`` for everything that belongs to ``adapter_name``;
    paths are relative to the module the adapters were injected into (:func:`adapter_owner`)."""
    model = adapter_owner(model) or model
    tensors: dict[str, torch.Tensor] = {}
    owned: set[int] = set()
    for path, module in adapter_modules(model):
        if adapter_name in module.adapter_names():
            for key, tensor in module.adapter_state(adapter_name).items():
                tensors[key if module.model_level else f"{KEY_PREFIX}{path}.{key}"] = tensor
            owned.update(id(t) for t in module.trainable_tensors(adapter_name))
    for name, param in adapter_parameters(model, adapter_name).items():
        if id(param) not in owned:  # biases freed by the config's ``bias`` setting
            tensors[KEY_PREFIX + name] = param
    return tensors


# PEFT's EMBEDDING_LAYER_NAMES: an adapted module of this name gets its base weight saved with the adapter
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the model's input and output embeddings (``get_input_embeddings`` /
    ``get_output_embeddings``, adapter wrappers included), relative to ``model``."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        method = getattr(type(model), getter, None)
        try:
            layer = method(model) if callable(method) else None
        except (AttributeError, NotImplementedError):
            layer = None
        if layer is None:
            continue
        for path, module in model.named_modules():
            if module is layer or getattr(module, "base_layer", None) is layer:
                found.append((path, module))
                break
    return found


def embedding_base_weights(model: nn.Module, adapter_name: str, saving: bool) -> dict[str, torch.Tensor]:
    """Base embedding weights that travel with an adapter, as PEFT's ``save_embedding_layers``:
    ``{file key: live weight}``. Saving (PEFT's "auto" rule): the base weight of an adapted
    ``embed_tokens`` / ``lm_head`` (``<path>.base_layer.weight``). Loading: any of the model's
    input / output embedding weights a PEFT file may carry (also ``<path>.weight`` of an embedding
    saved with ``save_embedding_layers=True`` without being adapted, e.g. after resizing the vocabulary)."""
    model = adapter_owner(model) or model
    # PEFT does not save them for an adapter with trainable tokens (those exist to save space)
    tokens = getattr(adapter_configs(model).get(adapter_name), "trainable_token_indices", None)
    weights = {}
    for path, module in _embedding_modules(model):
        wrapped = isinstance(module, AdapterModule) and module.wrapped_attr == "base_layer"
        if wrapped and adapter_name in module.adapter_names():
            if not saving or (path.rsplit(".", 1)[-1] in _EMBEDDING_NAMES and module.method == "lora" and not tokens):
                weights[f"{KEY_PREFIX}{path}.base_layer.weight"] = module.base_layer.weight
        elif not saving and not isinstance(module, AdapterModule) and isinstance(getattr(module, "weight", None), torch.Tensor):
            weights[f"{KEY_PREFIX}{path}.weight"] = module.weight
    return weights


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
                 trainer=None, model_card: bool = True) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``directory`` (created if needed).

    ``model`` may also be an outer module (a LightningModule): the file's keys are relative to the
    module the adapters were injected into, as PEFT expects.

    With ``model_card``, a ``README.md`` says what the adapter is and how to load it (PEFT,
    lightning-peft, vLLM multi-LoRA); ``trainer`` adds the fit's data counts and final metrics.

    The weights are written before the config, each atomically, so a reader never sees a config
    that points at missing weights. Returns the directory."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r} to save; this model has {list(configs)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {**embedding_base_weights(model, adapter_name, saving=True), **adapter_tensors(model, adapter_name)}
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    config = configs[adapter_name].to_dict()
    config["base_model_name_or_path"] = getattr(adapter_owner(model), "name_or_path", None) or None
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(text))
    if model_card:
        from .card import CARD_NAME, adapter_card

        card = adapter_card(config, model, trainer, adapter_name)
        atomic_write(directory / CARD_NAME, lambda tmp: tmp.write_text(card))
    return directory


def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [directory / n for n in PICKLE_NAMES if (directory / n).is_file()]
        if pickled and not allow_pickle:
            raise ValueError(f"{pickled[0]} is a pickled adapter; lightning-peft loads safetensors only, because "
                             f"unpickling can run arbitrary code. Convert it once where you trust the file "
                             f"(safetensors.torch.save_file(torch.load(path, weights_only=True), "
                             f"'{WEIGHTS_NAME}')), or pass allow_pickle=True to read it with "
                             f"torch.load(weights_only=True).")
        if pickled:
            return torch.load(pickled[0], map_location="cpu", weights_only=True)
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}; save_adapter writes one beside {CONFIG_NAME}.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read adapter weights {path}: the file is truncated or corrupt ({err}). "
                         f"Save the adapter again or restore the file.") from None


def check_tensors_fit(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], source: str,
                      what: str = "file", fix: str = "Load the adapter into the architecture (and config) it was "
                                                       "trained on.", extra: str | None = None) -> None:
    """Raise one ``ValueError`` listing shape mismatches (both shapes), missing and unexpected keys
    of ``loaded`` (from ``source``, a ``what``) against the model's ``expected`` tensors."""
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    mismatched = [f"{k}: {what} {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(expected.keys() & loaded.keys()) if loaded[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"adapter tensors in {source} do not fit this model's adapters:"]
    for title, items in (("shape mismatch", mismatched), (f"missing from the {what}", missing),
                         (f"in the {what} but not in the model", unexpected)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    if extra:
        lines.append(f"  {extra}")
    lines.append(fix)
    raise ValueError("\n".join(lines))


def read_adapter_config(directory: Path, config_class: type[AdapterConfig] | None = None) -> AdapterConfig:
    """The config in ``directory/adapter_config.json``, as the class its ``peft_type`` names (or as
    ``config_class``); a missing file or invalid JSON is an error that says so."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not an adapter directory "
                                f"(save_adapter or PEFT's save_pretrained write one).")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}).") from None
    if config_class is not None:
        return config_class.from_dict(data, source=str(config_path))
    return config_from_dict(data, source=str(config_path))


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 trainable: bool = False, allow_pickle: bool = False) -> nn.Module:
    """Read an adapter directory (ours or HF PEFT's) into ``model`` in place and make it active.

    Reads the config, injects adapter ``adapter_name`` as it describes, then copies the weights.
    Every key and shape is checked first; on any mismatch the injection is undone and one error
    lists the offending keys. ``trainable=False`` freezes the adapter (inference, DPO reference);
    ``True`` makes it the only thing that trains. Returns ``model``.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    loaded = _read_weights(directory, allow_pickle)
    # Injecting as the config says also redoes PiSSA's SVD split, which turns the base weights into
    # the residual the adapter was trained against (the file holds A and B, not the residual).
    # A prefix saved from a projection MLP is loaded as the prefix itself (PEFT does the same).
    _inject(model, config, adapter_name, loading=True)
    expected = adapter_tensors(model, adapter_name)
    # base embedding weights saved with the adapter (PEFT's save_embedding_layers): loaded into the model
    base = {k: t for k, t in embedding_base_weights(model, adapter_name, saving=False).items() if k in loaded}
    expected_all = {**base, **expected}
    try:
        check_tensors_fit(expected_all, loaded, str(directory / WEIGHTS_NAME), extra=(
            f"The file carries base embedding weights {sorted(base)} (PEFT's save_embedding_layers); if their "
            f"shapes differ, the vocabulary was resized in training: resize the model's embeddings to the file's "
            f"size first (transformers: model.resize_token_embeddings(n))." if base else None))
    except ValueError:
        delete_adapter(model, adapter_name)
        raise
    with torch.no_grad():
        for key, tensor in expected_all.items():
            tensor.copy_(loaded[key].to(tensor.dtype))
    set_adapter(model, adapter_name, trainable=trainable)
    return model


def read_training_state(directory: str | os.PathLike, map_location=None, weights_only: bool | None = None) -> dict:
    """The Lightning checkpoint inside an AdapterCheckpoint save directory."""
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is a directory without {TRAINING_STATE}: not an AdapterCheckpoint save "
                                f"(a directory of adapter files alone loads with lightning_peft.load_adapter).")
    return torch.load(path, map_location=map_location or "cpu", weights_only=True if weights_only is None else weights_only)


# ------------------------------------------------------------------ Lightning checkpoints (.ckpt)
def rng_states() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, Python, NumPy) in a form ``torch.load(weights_only=True)``
    accepts: tensors, ints and tuples only."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return states
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def checkpoint_meta(module: nn.Module) -> dict[str, Any]:
    """What a checkpoint carries besides tensors: the adapter configs, the quantization and the RNG
    states (so that a resumed run draws the same dropout masks): this process's, and in a
    multi-process run every rank's (``rng_states_by_rank``; gathering them is a collective, and
    Lightning builds a checkpoint on every rank)."""
    quant = quant_config(module)
    meta = {"adapters": {name: config.to_dict() for name, config in adapter_configs(module).items()},
            "quantization": None if quant is None else quant.to_dict(),
            "rng_states": rng_states()}
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        by_rank: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(by_rank, meta["rng_states"])
        meta["rng_states_by_rank"] = by_rank
    return meta


def restore_rng_states(meta: Mapping[str, Any] | None) -> None:
    """Set the RNG states a checkpoint's ``lightning_peft`` entry recorded: this rank's own when the
    run had as many processes as this one, else those of the process that wrote it."""
    if not meta or meta.get("rng_states") is None:
        return
    by_rank = meta.get("rng_states_by_rank")
    if by_rank and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and len(by_rank) == torch.distributed.get_world_size():
        set_rng_states(by_rank[torch.distributed.get_rank()])
    else:
        set_rng_states(meta["rng_states"])


def adapter_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of ``module`` that belong to any adapter (what our checkpoints hold)."""
    return {key for name in adapter_configs(module) for key in adapter_parameters(module, name)}


def check_checkpoint_adapters(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Raise one clear error unless ``checkpoint["state_dict"]`` holds exactly ``module``'s adapter
    tensors with their shapes (the frozen base is not expected); names both adapter configs when
    the checkpoint records its own."""
    keys = adapter_state_keys(module)  # once: it walks the whole model
    own = {k: v for k, v in module.state_dict().items() if k in keys}
    saved = checkpoint.get(CHECKPOINT_KEY, {}).get("adapters")
    configs = {n: c.to_dict() for n, c in adapter_configs(module).items()}
    extra = (f"the checkpoint was written with adapter configs {saved}, this run uses {configs}."
             if saved is not None and saved != configs else None)
    check_tensors_fit(own, checkpoint["state_dict"], "the checkpoint", what="checkpoint", extra=extra,
                      fix="Resume with the same peft_config (r, target_modules, use_dora, modules_to_save) as the run "
                          "that wrote the checkpoint; a checkpoint of a full fine-tune cannot resume a PEFT run.")
