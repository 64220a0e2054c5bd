"""Adapter files in the HF PEFT on-disk format, safetensors only, written atomically.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Keys are PEFT's:
``base_model.model.<module path>.lora_A.weight``, ``...lora_B.weight``,
``...lora_magnitude_vector`` (DoRA), ``...lora_embedding_A`` / ``_B`` (embeddings), ``...ia3_l``
((IA)^3), ``prompt_embeddings`` (prompt and prefix tuning: no module path), and the module's own
keys for ``modules_to_save`` copies and trained biases; the adapter name is not in the file.
Both libraries read each other's directories. Our saves add ``lightning_peft_checksums.json``, the
sha256 of each tensor file (PEFT ignores the file); loading verifies it when present. BitFit (``...bitfit_bias``) and bottleneck adapters
(``...adapter_down.weight`` etc.) have no PEFT counterpart: their keys are ours, same layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_directory, recover_directory, refuse_leftover
from .config import AdapterConfig, QuantConfig, config_from_dict
from .methods import AdapterModule
from .inject import (_inject, adapter_configs, adapter_modules, adapter_owner, adapter_parameters, check_adapter_name,
                     delete_adapter, set_adapter)
from .quantize import quant_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_PREFIX = "base_model.model."
TRAINING_STATE = "training_state.ckpt"  # beside the adapter files in an AdapterCheckpoint save
CHECKPOINT_KEY = "lightning_peft"  # the entry of a Lightning checkpoint that holds checkpoint_meta
CHECKSUMS_NAME = "lightning_peft_checksums.json"  # {"sha256": {tensor file name: hex digest}}; PEFT ignores it
MAX_JSON_BYTES = 16 * 2**20  # an adapter config is a few KB: anything this large is not one
# what save_adapter owns in its directory (replaced by each save); anything else there is kept
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CHECKSUMS_NAME, *PICKLE_NAMES)


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

    The sha256 of the weights file goes into ``lightning_peft_checksums.json`` (:func:`load_adapter`
    verifies it). The directory is replaced whole and atomically
    (:func:`lightning_peft.atomic.atomic_directory`): a crash at any instant leaves the previous
    save or the new one, never a mix of both; other files already in ``directory`` (your notes,
    other adapters' sub-folders) are kept. Returns the directory."""
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r} to save; this model has {list(configs)}.")
    directory = Path(directory)
    with atomic_directory(directory, owned=ADAPTER_FILES) as tmp:
        write_adapter_files(model, tmp, adapter_name, trainer=trainer, model_card=model_card)
    return directory


def write_adapter_files(model: nn.Module, directory: Path, adapter_name: str = "default", *, trainer=None,
                        model_card: bool = True) -> None:
    """The files of :func:`save_adapter`, written plainly into ``directory`` (a folder being built
    inside :func:`~lightning_peft.atomic.atomic_directory`, which makes the whole save atomic)."""
    configs = adapter_configs(model)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {**embedding_base_weights(model, adapter_name, saving=True), **adapter_tensors(model, adapter_name)}
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    digests = {WEIGHTS_NAME: hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()}  # bytes on disk
    config = configs[adapter_name].to_dict()
    config["base_model_name_or_path"] = getattr(adapter_owner(model), "name_or_path", None) or None
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / CHECKSUMS_NAME).write_text(json.dumps({"sha256": digests}, indent=2) + "\n")
    if model_card:
        from .card import CARD_NAME, adapter_card

        (directory / CARD_NAME).write_text(adapter_card(config, model, trainer, adapter_name))


def _read_json(path: Path, what: str) -> Any:
    """The JSON in ``path``; one ``ValueError`` naming the file for anything that is not JSON
    (bad UTF-8, syntax, nesting too deep, a file far too large to be ``what``)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path} is {path.stat().st_size:,} bytes: far too large for {what}; the file is "
                             f"not one (or is corrupt).")
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not {what}.") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid UTF-8 (byte {err.start}): {what} is UTF-8 JSON; the file is corrupt "
                         f"or not one.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    except RecursionError:
        raise ValueError(f"{path}: its JSON is nested too deeply to be {what}.") from None


def _verify_checksum(directory: Path, path: Path, data: bytes) -> None:
    """Compare ``data`` (the bytes of ``path``) with the sha256 recorded at save, if any."""
    sums_path = directory / CHECKSUMS_NAME
    if not sums_path.is_file():
        return  # PEFT's directories (and ours from before checksums) carry none
    sums = _read_json(sums_path, "a checksum file")
    recorded = sums.get("sha256") if isinstance(sums, dict) else None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise ValueError(f"{sums_path}: field 'sha256' must map file names to hex digests; the checksum file is "
                         f"corrupt. Delete it to load without the check, or save the adapter again.")
    expected = recorded.get(path.name)
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ValueError(f"{path} is truncated or corrupt: its sha256 {actual[:16]}... differs from {expected[:16]}... "
                         f"recorded in {CHECKSUMS_NAME} at save, so the file changed after the save (disk error, "
                         f"partial copy, edit). Restore the file or save the adapter again (if you changed the "
                         f"weights on purpose, delete {CHECKSUMS_NAME}).")


def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a regular file (a directory, device or pipe): not adapter weights.")
    if not path.is_file():
        pickled = [directory / n for n in PICKLE_NAMES if (directory / n).is_file()]
        if pickled and not allow_pickle:
            raise ValueError(f"{pickled[0]} is a pickled adapter; lightning-peft loads safetensors only, because "
                             f"unpickling can run arbitrary code. Convert it once where you trust the file "
                             f"(safetensors.torch.save_file(torch.load(path, weights_only=True), "
                             f"'{WEIGHTS_NAME}')), or pass allow_pickle=True to read it with "
                             f"torch.load(weights_only=True).")
        if not pickled:
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}; save_adapter writes one beside {CONFIG_NAME}.")
        path = pickled[0]
        tensors = load_checkpoint_file(path)
        if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()):
            raise ValueError(f"{path} is not an adapter state dict ({{name: tensor}}).")
        return _refuse_nonfinite(path, tensors)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read adapter weights {path} ({err.strerror or err}).") from None
    _verify_checksum(directory, path, data)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise ValueError(f"cannot read adapter weights {path}: the file is truncated or corrupt ({err}). "
                         f"Save the adapter again or restore the file.") from None
    return _refuse_nonfinite(path, tensors)


def _refuse_nonfinite(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    nonfinite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if nonfinite:
        raise ValueError(f"adapter weights {path} hold NaN or inf in {len(nonfinite)} tensors "
                         f"({', '.join(nonfinite[:4])}{' ...' if len(nonfinite) > 4 else ''}): the training diverged "
                         f"or the file is corrupt. Use an earlier checkpoint.")
    return tensors


def check_tensors_fit(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], source: str,
                      what: str = "file", fix: str = "Load the adapter into the architecture (and config) it was "
                                                       "trained on.", extra: str | None = None) -> None:
    """Raise one ``ValueError`` listing shape mismatches (both shapes), missing and unexpected keys
    of ``loaded`` (from ``source``, a ``what``) against the model's ``expected`` tensors."""
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    mismatched = [f"{k}: {what} {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(expected.keys() & loaded.keys()) if loaded[k].shape != expected[k].shape]
    mismatched += [f"{k}: {what} dtype {loaded[k].dtype} vs model {expected[k].dtype}"
                   for k in sorted(expected.keys() & loaded.keys())
                   if expected[k].is_floating_point() and not loaded[k].is_floating_point()]
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
    refuse_leftover(directory)
    recover_directory(directory)
    config_path = directory / CONFIG_NAME
    if config_path.exists() and not config_path.is_file():
        raise ValueError(f"{config_path} is not a regular file (a directory, device or pipe): not an adapter config.")
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not an adapter directory "
                                f"(save_adapter or PEFT's save_pretrained write one).")
    data = _read_json(config_path, "an adapter config")
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} holds a JSON {type(data).__name__}, not the object of an adapter config "
                         f"(field: the whole file). Save the adapter again.")
    build = (lambda d: config_class.from_dict(d, source=str(config_path))) if config_class is not None else (
        lambda d: config_from_dict(d, source=str(config_path)))
    try:
        return build(data)
    except (TypeError, ValueError) as err:
        message = str(err)
        if isinstance(err, TypeError):  # a wrong type no check names: find the field alone
            message = f"{_field_of_type_error(build, data)}{message}"
        raise ValueError(message if str(config_path) in message else f"{config_path}: {message}") from None


def _field_of_type_error(build, data: dict) -> str:
    """``"field 'x': "`` for the one field of ``data`` whose value alone makes ``build`` raise ``TypeError``."""
    base = {"peft_type": data["peft_type"]} if isinstance(data.get("peft_type"), str) else {}
    for key, value in data.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build({**base, key: value})
        except TypeError:
            return f"field {key!r} has the wrong type ({type(value).__name__}): "
        except ValueError:
            continue
    return ""


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 trainable: bool = False, allow_pickle: bool = False) -> nn.Module:
    """Read an adapter directory (ours or HF PEFT's) into ``model`` in place and make it active.

    Reads the config, injects adapter ``adapter_name`` as it describes, then copies the weights.
    Every key and shape is checked first; on any mismatch the injection is undone and one error
    lists the offending keys. ``trainable=False`` freezes the adapter (inference, DPO reference);
    ``True`` makes it the only thing that trains. Returns ``model``.
    """
    check_adapter_name(adapter_name)
    directory = Path(directory)
    config = read_adapter_config(directory)
    loaded = _read_weights(directory, allow_pickle)
    # Injecting as the config says also redoes PiSSA's SVD split, which turns the base weights into
    # the residual the adapter was trained against (the file holds A and B, not the residual).
    # A prefix saved from a projection MLP is loaded as the prefix itself (PEFT does the same).
    try:
        _inject(model, config, adapter_name, loading=True)
    except ValueError as err:
        raise ValueError(f"loading {directory}: {err}") from None
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
    try:
        _refuse_overflowing_updates(model, adapter_name, directory / CONFIG_NAME)
    except ValueError:
        delete_adapter(model, adapter_name)
        raise
    set_adapter(model, adapter_name, trainable=trainable)
    return model


def _refuse_overflowing_updates(model: nn.Module, adapter_name: str, config_path: Path) -> None:
    """Refuse a LoRA adapter whose update ``s B A`` is not finite in float32 (a ``lora_alpha`` of
    1e308 is finite, but scales any update to inf). Cheap: ``s r max|B| max|A|`` bounds every entry,
    and only a layer whose bound overflows gets its update computed."""
    from .methods import LoraLayer

    limit = torch.finfo(torch.float32).max
    with torch.no_grad():
        for path, layer in adapter_modules(model):
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.scaling:
                continue
            A, B = layer._factors(adapter_name)
            bound = abs(layer.scaling[adapter_name]) * A.shape[0] * A.abs().max().item() * B.abs().max().item()
            if bound < limit or torch.isfinite(layer.delta_weight(adapter_name).float()).all():
                continue
            raise ValueError(f"{config_path}: the scaling {layer.scaling[adapter_name]:.3g} (lora_alpha / r) makes the "
                             f"update s * B @ A of layer {path} overflow float32 (inf): field lora_alpha (or "
                             f"alpha_pattern) is not a value training could have produced. Fix it in the file.")


def is_save_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory to load from (an ``AdapterCheckpoint`` save), after undoing an
    interrupted replacement of it; a hidden leftover of an interrupted save or delete is refused."""
    refuse_leftover(path)
    recover_directory(path)
    return Path(path).is_dir()


def read_training_state(directory: str | os.PathLike, map_location=None, weights_only: bool | None = None) -> dict:
    """The Lightning checkpoint inside an AdapterCheckpoint save directory (``weights_only``: see
    :func:`load_checkpoint_file`)."""
    refuse_leftover(directory)
    recover_directory(directory)
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is a directory without {TRAINING_STATE}: not an AdapterCheckpoint save "
                                f"(a directory of adapter files alone loads with lightning_peft.load_adapter).")
    return load_checkpoint_file(path, map_location, weights_only)


def load_checkpoint_file(path: str | os.PathLike, map_location=None, weights_only: bool | None = None,
                         load=None) -> dict:
    """A Lightning checkpoint (a pickle) loaded with ``torch.load(weights_only=True)``: tensors and
    plain data only, so a file whose pickle would run code (``__reduce__``) is refused, not run.
    ``weights_only=False`` is honoured only when passed explicitly (for a file you trust).

    ``load(path, map_location, weights_only)`` does the reading (default: ``torch.load``; the
    strategy passes its checkpoint IO). Every failure is one ``ValueError`` naming the file: a
    refused pickle (with the object it holds and the fix), an empty / truncated / non-checkpoint file."""
    weights_only = True if weights_only is None else weights_only
    load = load or (lambda p, m, w: torch.load(p, map_location=m or "cpu", weights_only=w))
    try:
        checkpoint = load(path, map_location, weights_only)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err).lower() and "weights only" not in str(err).lower():
            raise ValueError(f"cannot read checkpoint {path}: it is corrupt or not a torch checkpoint ({err}).") from None
        found = re.search(r"(?:Unsupported global|Unsupported operand)[^\n]*", str(err))
        raise ValueError(f"refused to load {path}: it holds pickled objects beyond tensors and plain data "
                         f"({found.group(0) if found else str(err).splitlines()[0]}), and unpickling those could run "
                         f"arbitrary code, so lightning-peft loads checkpoints with torch.load(weights_only=True). "
                         f"Our strategies' and AdapterCheckpoint's checkpoints need nothing more; if you wrote this "
                         f"file yourself and trust it, allow that class with "
                         f"torch.serialization.add_safe_globals([...]).") from None
    except (EOFError, RuntimeError, ValueError, OSError) as err:
        if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        detail = "the file is empty" if isinstance(err, EOFError) else str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot read checkpoint {path}: it is empty, truncated or not a torch checkpoint "
                         f"({detail}). Resume from another checkpoint (AdapterCheckpoint keeps 'last' and the best "
                         f"ones).") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict).")
    return checkpoint


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


def check_checkpoint_structure(checkpoint: Mapping[str, Any]) -> None:
    """One ``ValueError`` naming the field unless ``checkpoint`` has the shape our strategies write:
    ``state_dict`` ``{key: tensor}``, and a ``lightning_peft`` entry (when present) whose adapter
    names are names and whose recorded configs and quantization are valid."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError("the checkpoint's field 'state_dict' is missing or not {key: tensor}: the file is not a "
                         "Lightning checkpoint, or it is corrupt. Use another checkpoint.")
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        return
    adapters = meta.get("adapters") if isinstance(meta, Mapping) else None
    if not isinstance(adapters, Mapping) or not adapters or not all(isinstance(c, Mapping) for c in adapters.values()):
        raise ValueError(f"the checkpoint's field '{CHECKPOINT_KEY}' (its 'adapters': {{name: config}}) is malformed; "
                         f"the checkpoint is corrupt. Use another checkpoint.")
    try:
        for name, config in adapters.items():
            check_adapter_name(name, f"{CHECKPOINT_KEY}.adapters name")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config_from_dict(dict(config), source=f"{CHECKPOINT_KEY}.adapters[{name!r}]")
        if meta.get("quantization") is not None:
            QuantConfig.from_dict(dict(meta["quantization"]))
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"the checkpoint records invalid adapter settings: {err}") from None


def _fields(config: Any) -> Any:
    """Every field of an adapter config (a recorded dict or a config object), defaults included, so
    that a field written only when set (``use_rslora``) compares as its value."""
    if isinstance(config, Mapping):
        try:
            config = config_from_dict(dict(config))
        except (TypeError, ValueError):
            return dict(config)
    if dataclasses.is_dataclass(config):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return config.to_dict()


def _field_differences(saved: Any, own: Any, where: str) -> list[str]:
    if not (isinstance(saved, dict) and isinstance(own, dict)):
        return [] if saved == own else [f"{where}: checkpoint {saved!r}, strategy {own!r}"]
    return [f"{where}{key}: checkpoint {saved.get(key)!r}, strategy {own.get(key)!r}"
            for key in sorted(saved.keys() | own.keys(), key=str) if saved.get(key) != own.get(key)]


def check_resume_config(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Refuse to resume when the adapter configs or the quantization recorded in ``checkpoint``
    differ from ``module``'s (what the strategy set up): one ``ValueError`` lists every differing
    field (``lora_alpha: checkpoint 32, strategy 64``). Keys and shapes alone would let a changed
    ``lora_alpha``, ``use_rslora`` or quantization through: the run would go on computing another
    function than the one trained."""
    meta = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(meta, Mapping):
        return  # not ours: check_checkpoint_adapters names what is missing
    lines = []
    saved_adapters = meta.get("adapters")
    own_adapters = dict(adapter_configs(module))
    if isinstance(saved_adapters, Mapping):
        for name in sorted(saved_adapters.keys() - own_adapters.keys()):
            lines.append(f"adapter {name!r}: in the checkpoint, not in this run")
        for name in sorted(own_adapters.keys() - saved_adapters.keys()):
            lines.append(f"adapter {name!r}: in this run, not in the checkpoint")
        for name in sorted(saved_adapters.keys() & own_adapters.keys()):
            prefix = "" if len(own_adapters) == 1 else f"adapter {name!r} "
            lines += _field_differences(_fields(saved_adapters[name]), _fields(own_adapters[name]), prefix)
    if "quantization" in meta:
        quant = quant_config(module)
        saved_quant, own_quant = meta["quantization"], None if quant is None else quant.to_dict()
        if saved_quant is None or own_quant is None:
            if saved_quant != own_quant:
                describe = lambda q: "none (float base)" if q is None else f"{q.get('quant_type')} ({q})"  # noqa: E731
                lines.append(f"quantization: checkpoint {describe(saved_quant)}, strategy {describe(own_quant)}")
        else:
            lines += _field_differences(saved_quant, own_quant, "quantization.")
    if lines:
        raise ValueError("cannot resume: this run's adapter configuration differs from the checkpoint's, so it would "
                         "continue training a different function than the one saved:\n  " + "\n  ".join(lines) +
                         "\nResume with the settings the checkpoint was written with (the strategy's peft_config and "
                         "quantization; e.g. strategy='qlora' vs 'lora'), or start a new run from its adapters "
                         "(lightning_peft.load_adapter(..., trainable=True), then fit without ckpt_path).")


def check_checkpoint_adapters(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Raise one clear error unless ``checkpoint["state_dict"]`` holds exactly ``module``'s adapter
    tensors with their shapes (the frozen base is not expected); names both adapter configs when
    the checkpoint records its own."""
    check_checkpoint_structure(checkpoint)
    keys = adapter_state_keys(module)  # once: it walks the whole model
    own = {k: v for k, v in module.state_dict().items() if k in keys}
    saved = checkpoint.get(CHECKPOINT_KEY, {}).get("adapters")
    configs = {n: c.to_dict() for n, c in adapter_configs(module).items()}
    extra = (f"the checkpoint was written with adapter configs {saved}, this run uses {configs}."
             if saved is not None and saved != configs else None)
    check_tensors_fit(own, checkpoint["state_dict"], "the checkpoint", what="checkpoint", extra=extra,
                      fix="Resume with the same peft_config (r, target_modules, use_dora, modules_to_save) as the run "
                          "that wrote the checkpoint; a checkpoint of a full fine-tune cannot resume a PEFT run.")
    _refuse_nonfinite("the checkpoint", {k: v for k, v in checkpoint["state_dict"].items() if k in keys})
