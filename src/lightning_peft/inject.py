"""Put adapters into a model in place, pick the active one, switch them off, freeze the rest.

Works on any ``torch.nn.Module`` (no Trainer needed). Targeted layers are replaced by an
adapter module that wraps them (``q_proj`` becomes ``LoraLayer(base_layer=q_proj)``, likewise
``IA3Layer``, ``BitFitLayer``, ``BottleneckLayer``), so module paths and state-dict keys match HF
PEFT's in-memory layout. Prompt and prefix tuning wrap nothing: one ``PromptLearning`` module hangs
off the model and a forward pre-hook adds the virtual tokens. The method follows from the
config's type (``LoraConfig``, ``IA3Config``, ``BitFitConfig``, ``PromptTuningConfig``,
``PrefixTuningConfig``, ``BottleneckConfig``). The configs of the injected adapters
are kept on the module they were injected into as ``lp_adapter_configs`` (``{adapter name:
config}``); functions given an outer module (a LightningModule holding a transformers model) find
them there.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .config import AdapterConfig, BitFitConfig, BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from .methods import (AdapterModule, BitFitLayer, BottleneckLayer, IA3Layer, LoraLayer, LoraParamLayer, ModulesToSave,
                      TrainableTokensLayer)
from .methods.bitfit import bias_size
from .methods.base import base_kind
from .methods.ia3_conv import IA3ConvLayer
from .methods.lora_conv import LoraConvLayer, is_conv
from .methods.lora_mha import LoraMHALayer, is_mha
from .methods.prompt import inject_prompt_learning
from .modules import find_attribute, output_heads, replace_module
from .targets import IA3_TARGETS, LORA_TARGETS, default_targets

CONFIGS_ATTR = "lp_adapter_configs"
MAX_NAME_BYTES = 255  # a file name's limit on common file systems: a named adapter is saved as a sub-folder


def check_adapter_name(name, what: str = "adapter_name") -> str:
    """Return ``name`` if it can name an adapter, else raise one ``ValueError`` that says why.

    A name is a state-dict key part and, in multi-adapter saves, a sub-folder name, so it must be
    a single path component: a non-empty ``str`` of at most 255 UTF-8 bytes without dots (``..``
    included), ``/``, ``\\``, ``:`` or control characters (so never an absolute path either)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}={name!r}: an adapter name must be a non-empty string, e.g. 'default' or 'math'.")
    bad = sorted({c for c in name if c in "./\\:" or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"{what}={name!r} contains {shown}: an adapter name is one path component (it names "
                         f"a sub-folder of a save and a part of state-dict keys), so it may not hold dots, slashes, "
                         f"backslashes, colons or control characters. Use letters, digits, '-' or '_'.")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"{what}: an adapter name of {len(name.encode('utf-8'))} bytes is too long; a name is at "
                         f"most {MAX_NAME_BYTES} bytes (UTF-8), the file-name limit of common file systems.")
    return name


# ---------------------------------------------------------------------------- model inspection
def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """``{adapter name: config}`` of the adapters injected into ``model`` or a submodule of it
    (empty if none). Target paths in the configs are relative to :func:`adapter_owner`."""
    return find_attribute(model, CONFIGS_ATTR)[1] or {}


def adapter_owner(model: nn.Module) -> nn.Module | None:
    """The module the adapters were injected into: ``model`` itself or the submodule (say, the
    transformers model inside a LightningModule) whose paths the adapter files use."""
    return find_attribute(model, CONFIGS_ATTR)[0]


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """``(path, module)`` of every adapter module in ``model``, in ``named_modules`` order.

    Does not walk into an adapter module's own stores (``lora_A``, ``lora_B``, ...: two thirds of
    the modules of a model with 8 LoRA adapters, and path strings built for each), unless they hold
    copies of user modules (``modules_to_save``)."""
    seen: set[int] = set()
    pending = [("", model)]
    while pending:
        path, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        skip: tuple[str, ...] = ()
        if isinstance(module, AdapterModule):
            yield path, module
            skip = () if module.stores_hold_user_modules else module.adapter_stores
        prefix = path + "." if path else ""
        pending.extend((prefix + name, child) for name, child in reversed(module._modules.items())
                       if child is not None and name not in skip)


def _user_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of the user's own modules: adapter modules count as the layer they
    wrap, and their internals (``base_layer``, ``lora_A``, ...) are not listed."""
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        yield path, child
        if not isinstance(child, AdapterModule):
            yield from _user_modules(child, path + ".")


def _matches(names, path: str) -> bool:
    """PEFT's rule: a string is a regex on the full path; a list entry matches the path itself or
    a dotted suffix of it (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``)."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def _layer_index(path: str, layers_pattern) -> int | None:
    """The layer index in ``path`` (PEFT's rule): the number after ``layers_pattern``
    (``model.layers.3.mlp`` -> 3), or without a pattern the first ``<name>.<number>.`` after a dot."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for m in (re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", path) for p in patterns) if m), None)
    return int(match.group(1)) if match else None


def _in_layers(names, path: str, layers, layers_pattern) -> bool:
    """Whether ``path`` (a match of ``names``) passes ``layers_to_transform``; as in PEFT, a path
    listed exactly, or a regex ``names``, is not filtered."""
    if layers is None or layers == [] or isinstance(names, str) or path in names:
        return True
    index = _layer_index(path, layers_pattern)
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def _pattern_value(pattern: dict, path: str, default):
    """The value of the first ``pattern`` key matching the end of ``path`` (PEFT's ``(.*\\.)?(key)$``)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _unwrap(module: nn.Module) -> nn.Module:
    """The user's layer inside a layer-wrapping adapter module (``modules_to_save`` copies excepted)."""
    return module.base_layer if isinstance(module, AdapterModule) and module.wrapped_attr == "base_layer" else module


def _closest(name: str, paths: list[str]) -> list[str]:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return difflib.get_close_matches(name, leaves, n=5, cutoff=0.5) or difflib.get_close_matches(
        name, paths, n=5, cutoff=0.4)


def _select(model: nn.Module, names, exclude=None, saved=None, each: bool = True, layers=None,
            layers_pattern=None) -> list[tuple[str, nn.Module]]:
    """The user modules ``names`` selects (``"all-linear"``, a regex, or names / dotted suffixes),
    minus ``exclude`` and ``saved`` (``modules_to_save``), in ``layers`` (``layers_to_transform``)
    only. ``each``: every listed name must match something (else: one of them must); the error
    lists the closest module names."""
    modules = list(_user_modules(model))
    paths = [p for p, _ in modules]
    candidates = [(p, m) for p, m in modules
                  if not (exclude and _matches(exclude, p)) and not (saved and _matches(saved, p))
                  and _in_layers(names, p, layers, layers_pattern)]
    if names == "all-linear":
        heads = output_heads(model)
        targets = [(p, m) for p, m in candidates
                   if base_kind(_unwrap(m)) in ("linear", "conv1d") and id(_unwrap(m)) not in heads
                   and p.rsplit(".", 1)[-1] != "lm_head"]
        if not targets:
            raise ValueError(f'target_modules="all-linear" found no nn.Linear / Conv1D layer in '
                             f"{type(model).__name__}; name the layers to adapt instead.")
        _warn_if_mostly_convolutions(model, targets, modules)
        return targets
    targets = [(p, m) for p, m in candidates if _matches(names, p)]
    wanted = [names] if isinstance(names, str) else [[n] for n in names]
    # a name counts as found when it matches a module, excluded or not: PEFT writes the names it was
    # given next to the exclude list (target_modules=["lin0", "lin1"], exclude_modules=["lin1"])
    missing = [w for w in wanted if not any(_matches(w, p) for p in paths)]
    if not targets and not missing and layers is not None:
        raise ValueError(f"target_modules={names!r} with layers_to_transform={layers!r}, layers_pattern="
                         f"{layers_pattern!r} selects no module of {type(model).__name__}: no matching module sits "
                         f"in those layers (the index is the number after layers_pattern in the module path, e.g. "
                         f"model.layers.3.mlp). Fix the indices or the pattern.")
    if missing and (each or len(missing) == len(wanted)):
        name = missing[0] if isinstance(missing[0], str) else missing[0][0]
        raise ValueError(f"target module {name!r} matches no module of {type(model).__name__}. "
                         f"Closest module names: {_closest(name, paths)}. Fix the module names "
                         f'(names, dotted suffixes, a regex, or "all-linear").')
    return targets


# LoRA's layer kinds beyond LoraLayer's own (nn.Linear, transformers Conv1D, nn.Embedding): (test, class)
LORA_LAYER_KINDS = ((is_conv, LoraConvLayer), (is_mha, LoraMHALayer))
# (IA)^3's layer kinds beyond IA3Layer's own (nn.Linear, transformers Conv1D)
IA3_LAYER_KINDS = ((is_conv, IA3ConvLayer),)


def _kind_class(module: nn.Module, kinds, default: type | None) -> type | None:
    """The adapter class ``kinds`` gives ``module`` (the user's layer), else ``default``."""
    return next((cls for test, cls in kinds if test(module)), default)


def _lora_wraps(module: nn.Module) -> bool:
    return base_kind(module) is not None or _kind_class(module, LORA_LAYER_KINDS, None) is not None


def _attention_targets(model: nn.Module, config: LoraConfig, targets: list) -> list[tuple[str, nn.Module]]:
    """``targets`` with each ``out_proj`` of an ``nn.MultiheadAttention`` replaced by the attention
    module itself (its forward reads ``out_proj.weight`` and never calls ``out_proj``: a LoRA there
    would be dead); "all-linear" takes every attention module."""
    chosen: dict[str, nn.Module] = {}
    for path, module in targets:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else None
        if leaf == "out_proj" and owner is not None and is_mha(_unwrap(owner)):
            if config.target_modules != "all-linear":
                warnings.warn(f"target {path!r} is the out_proj of an nn.MultiheadAttention, whose forward never calls it: "
                              f"LoRA goes on the attention module {parent!r} instead (in_proj and out_proj, as in PEFT).",
                              stacklevel=4)
            chosen[parent] = owner
        else:
            chosen[path] = module
    if config.target_modules == "all-linear":
        for path, module in _user_modules(model):
            if is_mha(_unwrap(module)) and not (config.exclude_modules and _matches(config.exclude_modules, path)):
                chosen.setdefault(path, module)
    order = {p: i for i, (p, _) in enumerate(_user_modules(model))}
    return sorted(chosen.items(), key=lambda item: order.get(item[0], 0))


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # torch's; transformers' Conv1D is a linear layer


def _warn_if_mostly_convolutions(model: nn.Module, targets, modules) -> None:
    """``"all-linear"`` picks linear layers only (as in PEFT): say so, with the counts, when the
    model's convolutions hold more weights than the layers it picked (a CNN whose only linear
    layer is its classifier would otherwise train that alone, silently)."""
    convs = [(p, _unwrap(m)) for p, m in modules if isinstance(_unwrap(m), _CONVOLUTIONS)]
    conv = sum(m.weight.numel() for _, m in convs)
    adapted = sum(_unwrap(m).weight.numel() for _, m in targets)
    if conv > adapted:
        n = len(targets)
        warnings.warn(f'target_modules="all-linear" adapts {n} linear layer{"s" if n != 1 else ""} with {adapted:,} '
                      f"weights, but {len(convs)} convolution layers hold {conv:,} weights that it leaves alone (it "
                      f"picks linear layers only, as in PEFT). To adapt the convolutions, name them in target_modules, "
                      f"e.g. target_modules={[p for p, _ in convs[:3]]}.", stacklevel=4)


def _find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    if config.target_modules is None and config.target_parameters:
        return []  # parameters only
    if config.target_modules is None:  # PEFT's default for the architecture
        config = dataclasses.replace(config, target_modules=default_targets(
            LORA_TARGETS, model, "LoraConfig(target_modules=None)",
            'LoraConfig(target_modules="all-linear") or LoraConfig(target_modules=["q_proj", "v_proj"])'))
    targets = _select(model, config.target_modules, config.exclude_modules, config.modules_to_save,
                      layers=config.layers_to_transform, layers_pattern=config.layers_pattern)
    targets = _attention_targets(model, config, targets)
    unsupported = [(p, type(m).__name__) for p, m in targets if not _lora_wraps(_unwrap(m))]
    if unsupported:
        raise ValueError(f"target_modules selects modules LoRA cannot wrap: {unsupported[:5]}. LoRA wraps "
                         f"nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention; "
                         f"narrow target_modules.")
    return targets


# ----------------------------------------------------------------------------------- injection
def inject_adapters(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place, make it active, and freeze everything
    else (see :func:`set_adapter`). The method follows from the config's type. Returns ``model``.

    Raises ``ValueError`` (before changing anything) for a name already in use, a target that
    matches nothing (listing the closest module names) or a module type the method cannot wrap.
    """
    return _inject(model, config, adapter_name)


def _inject(model: nn.Module, config: AdapterConfig, adapter_name: str, loading: bool = False) -> nn.Module:
    """:func:`inject_adapters`; ``loading``: weights are copied in next (load_adapter), so
    methods skip starting values that would be overwritten (prompt text, prefix MLP)."""
    if type(config) not in _INJECTORS:
        raise TypeError(f"inject_adapters expects an adapter config ({', '.join(c.__name__ for c in _INJECTORS)}), "
                        f"got {type(config).__name__}.")
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    owner = adapter_owner(model)
    if owner is not None and owner is not model:
        path = next(p for p, m in model.named_modules() if m is owner)
        raise ValueError(f"adapters were injected into the submodule {path!r} of this model; inject further "
                         f"adapters there too (inject_adapters(model.{path}, ...)).")
    if adapter_name in configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r} (has {list(configs)}); "
                         f"pick another adapter_name.")
    _refuse_if_merged(model, "inject another adapter")
    resolved = _INJECTORS[type(config)](model, config, adapter_name, loading)
    # a plain dict attribute (not a submodule): travels with the model, ignored by state_dict
    object.__setattr__(model, CONFIGS_ATTR, {**configs, adapter_name: resolved})
    set_adapter(model, adapter_name)
    return model


def _inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str, loading: bool) -> LoraConfig:
    targets = _find_targets(model, config)
    saved = _find_saved(model, config)
    params = _find_parameters(model, config, {p for p, _ in targets})
    tokens = _find_token_rows(model, config, {p for p, _ in targets} | {p for p, _ in saved})

    # (_wrap_all sets each layer's train/eval mode after add_adapter: new dropout modules follow it)
    _wrap_all(model, targets, LoraLayer, "LoRA",
              lambda layer, path: layer.add_adapter(
                  adapter_name, r=_pattern_value(config.rank_pattern, path, config.r),
                  lora_alpha=_pattern_value(config.alpha_pattern, path, config.lora_alpha),
                  lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                  use_dora=config.use_dora, init_lora_weights=config.init_lora_weights,
                  lora_bias=config.lora_bias),
              make=lambda m: _kind_class(m, LORA_LAYER_KINDS, LoraLayer)(m))
    _note_float_layers(model, targets)
    _wrap_parameters(model, params, lambda layer, path: layer.add_adapter(
        adapter_name, r=_pattern_value(config.rank_pattern, path, config.r),
        lora_alpha=_pattern_value(config.alpha_pattern, path, config.lora_alpha),
        use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights))
    _wrap_saved(model, saved, adapter_name)
    _wrap_token_rows(model, tokens, adapter_name)
    return dataclasses.replace(config, target_modules=sorted(p for p, _ in targets) or None,
                               trainable_token_indices={p: ids for p, _, ids, _ in tokens} or None,
                               target_parameters=sorted(f"{p}.{n}" for p, _, n in params) or None,
                               fan_in_fan_out=_fan_in_fan_out(config, targets, "LoraConfig"))


def _fan_in_fan_out(config, targets, name: str) -> bool:
    """The ``fan_in_fan_out`` the layers have: ``True`` when a target is a transformers ``Conv1D``
    (stored ``[in, out]``). ``fan_in_fan_out=True`` asked for on ``nn.Linear`` targets (stored
    ``[out, in]``) is corrected to ``False`` for them with a warning, as PEFT does: honouring it would
    transpose the update (a wrong merge, or a shape error)."""
    linear = [p for p, m in targets if base_kind(_unwrap(m)) == "linear"]
    if config.fan_in_fan_out and linear:
        warnings.warn(f"{name}(fan_in_fan_out=True), but {len(linear)} targets are torch.nn.Linear ({linear[0]}"
                      f"{', ...' if len(linear) > 1 else ''}), which store [out, in]: fan_in_fan_out is set to False "
                      f"for them (as PEFT does). It only describes transformers Conv1D layers, where it is set for "
                      f"you.", UserWarning, stacklevel=4)
    return any(base_kind(_unwrap(m)) == "conv1d" for _, m in targets)


def _find_parameters(model: nn.Module, config: LoraConfig, module_targets: set[str]) -> list[tuple[str, nn.Module, str]]:
    """``(module path, module, parameter name)`` for ``config.target_parameters`` (PEFT's rule: the
    name ``<module path>.<parameter>`` equals an entry or ends with ``.<entry>``), in the module's
    parameter order; each entry must match, and not a module that ``target_modules`` adapts too."""
    wanted = config.target_parameters
    if not wanted:
        return []
    found, keys = [], []
    for path, module in _user_modules(model):
        real = module.chain()[1] if isinstance(module, LoraParamLayer) else _unwrap(module)
        for name, _ in real.named_parameters(recurse=False):
            key = f"{path}.{name}"
            keys.append(key)
            if any(key == w or key.endswith("." + w) for w in wanted):
                found.append((path, module, name))
    missing = [w for w in wanted if not any(f"{p}.{n}" == w or f"{p}.{n}".endswith("." + w) for p, _, n in found)]
    if missing:
        raise ValueError(f"target_parameters entry {missing[0]!r} matches no parameter of {type(model).__name__}. "
                         f"Closest parameter names: {difflib.get_close_matches(missing[0], keys, n=5, cutoff=0.4)}. "
                         f"Name them as '<module path>.<parameter>' or a dotted suffix of it.")
    clash = sorted(module_targets.intersection(p for p, _, _ in found))
    if clash:
        raise ValueError(f"modules {clash[:3]} are picked by target_modules and target_parameters at once; adapt each "
                         f"module one way (exclude_modules=[...] or narrow the names).")
    real = {p: (m.chain()[1] if isinstance(m, LoraParamLayer) else _unwrap(m)) for p, m, _ in found}
    bad = [(f"{p}.{n}", tuple(getattr(real[p], n).shape)) for p, _, n in found
           if getattr(real[p], n).dim() not in (2, 3) or not getattr(real[p], n).is_floating_point()]
    if bad:
        raise ValueError(f"target_parameters picks {bad[:3]}: LoRA adapts 2-D [out, in] and 3-D [experts, out, in] "
                         f"float parameters only; narrow target_parameters.")
    taken = [(p, m.method) for p, m, _ in found if isinstance(m, AdapterModule) and not isinstance(m, LoraParamLayer)]
    if taken:
        raise ValueError(f"LoRA cannot go on parameters of modules that already carry another method's adapter: "
                         f"{taken[:5]}. Use one method per module.")
    return found


def _find_token_rows(model: nn.Module, config: LoraConfig, taken: set[str]):
    """``(path, embedding, token ids, tied heads [(path, module)])`` for ``trainable_token_indices``:
    a list means the input embedding (``get_input_embeddings``, else a module named ``embed_tokens``);
    a dict names the embeddings. Heads whose weight is the embedding's (tied) follow it."""
    wanted = config.trainable_token_indices
    if not wanted:
        return []
    modules = list(_user_modules(model))
    if not isinstance(wanted, dict):
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        path = next((p for p, m in modules if embedding is not None and _unwrap(m) is embedding), None)
        path = path or next((p for p, _ in modules if p.rsplit(".", 1)[-1] == "embed_tokens"), None)
        if path is None:
            raise ValueError(f"trainable_token_indices={wanted} as a list means the input embedding, and "
                             f"{type(model).__name__} has none (no get_input_embeddings, no embed_tokens): name it, "
                             f"trainable_token_indices={{'<embedding module>': {wanted}}}.")
        wanted = {path: wanted}
    found = []
    for name, ids in wanted.items():
        hits = [(p, m) for p, m in modules if _matches([name], p)]
        if len(hits) != 1:
            raise ValueError(f"trainable_token_indices key {name!r} matches {len(hits)} modules "
                             f"({[p for p, _ in hits][:4] or _closest(name, [p for p, _ in modules])}); name one "
                             f"nn.Embedding by its path or a unique suffix.")
        path, module = hits[0]
        if path in taken:
            raise ValueError(f"{path} is in target_modules or modules_to_save and in trainable_token_indices: train its "
                             f"rows one way (drop it from one of them).")
        real = _unwrap(module)
        if not isinstance(real, nn.Embedding) or (isinstance(module, AdapterModule)
                                                  and not isinstance(module, TrainableTokensLayer)):
            raise ValueError(f"trainable_token_indices names {path} ({type(module).__name__}); it trains rows of an "
                             f"nn.Embedding that carries no other adapter.")
        bad = [i for i in ids if i >= real.num_embeddings]
        if bad:
            raise ValueError(f"trainable_token_indices {bad[:5]} are outside {path}'s {real.num_embeddings} rows; resize "
                             f"the embeddings first (transformers: model.resize_token_embeddings(n)).")
        tied = [(p, m) for p, m in modules if p != path and _unwrap(m) is not real
                and getattr(_unwrap(m), "weight", None) is real.weight]
        clash = [p for p, m in tied if p in taken or (isinstance(m, AdapterModule)
                                                       and not isinstance(m, TrainableTokensLayer))]
        if clash:
            raise ValueError(f"{clash} share {path}'s weight (tied) and carry another adapter; trainable tokens change "
                             f"those rows in both. Leave the tied head out of target_modules / modules_to_save.")
        found.append((path, module, list(ids), tied))
    return found


def _wrap_token_rows(model: nn.Module, tokens, adapter_name: str) -> None:
    for path, module, ids, tied in tokens:
        layer = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module)
        layer.add_adapter(adapter_name, ids)
        layer.train(module.training)
        if layer is not module:
            replace_module(model, path, layer)
        for head_path, head in tied:
            if not isinstance(head, TrainableTokensLayer):
                wrapper = TrainableTokensLayer(head, tied_to=layer)
                wrapper.train(head.training)
                replace_module(model, head_path, wrapper)


def _wrap_parameters(model: nn.Module, params, add) -> None:
    """Give each ``(path, module, parameter)`` its LoraParamLayer (nested, one per parameter, the
    first innermost; an existing one for that parameter is reused) and call ``add(layer, path)``."""
    for path, module, name in params:
        outer = model.get_submodule(path)
        layers = outer.chain()[0] if isinstance(outer, LoraParamLayer) else []
        layer = next((l for l in layers if l.parameter_name == name), None)
        if layer is None:
            layer = LoraParamLayer(outer, name)
            replace_module(model, path, layer)
        add(layer, path)
        layer.train(module.training)


def _note_float_layers(model: nn.Module, targets) -> None:
    """On a quantized model, say which targets keep a float base (bitsandbytes quantizes only
    nn.Linear: no convolution, no attention module)."""
    from .quantize import quant_config  # local: quantize imports the methods package

    if quant_config(model) is None:
        return
    kept = sorted({type(_unwrap(m)).__name__ for _, m in targets if is_conv(_unwrap(m)) or is_mha(_unwrap(m))})
    if kept:
        count = sum(1 for _, m in targets if is_conv(_unwrap(m)) or is_mha(_unwrap(m)))
        from lightning.pytorch.utilities.rank_zero import rank_zero_info  # imported here: inject stays light

        rank_zero_info(f"lightning-peft: {count} adapted layers ({', '.join(kept)}) keep a float base weight: bitsandbytes "
                  f"has no 4-bit kernel for them; their adapters train on the float weight.")


# children that their parent never calls as a module: it reads their weight. nn.MultiheadAttention
# passes out_proj.weight and .bias to F.multi_head_attention_forward, so anything wrapping out_proj
# (a LoRA, (IA)^3 or BitFit layer, a modules_to_save copy) would get no input and no gradient while
# counting as trainable and being saved (docs/architecture.md, "Errors").
_WEIGHT_READ_CHILDREN = ((nn.MultiheadAttention, "out_proj"),)


def _refuse_weight_read(model: nn.Module, targets, what: str) -> None:
    """Refuse targets whose parent reads their weight instead of calling them (see above)."""
    dead = []
    for path, _ in targets:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        kinds = [kind.__name__ for kind, child in _WEIGHT_READ_CHILDREN if isinstance(parent, kind) and attr == child]
        if kinds:
            dead.append((path, kinds[0], attr))
    if dead:
        path, kind, attr = dead[0]
        paths = [p for p, _, _ in dead]
        raise ValueError(f"{what} cannot go on {paths[:5]}: {kind} never calls its {attr} as a module (its forward "
                         f"reads {attr}.weight directly), so the adapter would get no input and no gradient while "
                         f"counting as trainable. Leave it out: exclude_modules={sorted({p.rsplit('.', 1)[-1] for p in paths})} "
                         f"(or name other modules in target_modules / modules_to_save).")


def _find_saved(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """The modules ``config.modules_to_save`` names (each name must match one)."""
    saved = [(p, m) for p, m in _user_modules(model)
             if config.modules_to_save and _matches(config.modules_to_save, p)]
    if config.modules_to_save and not saved:
        raise ValueError(f"modules_to_save={config.modules_to_save} matches no module; closest names: "
                         f"{_closest(config.modules_to_save[0], [p for p, _ in _user_modules(model)])}.")
    _refuse_weight_read(model, saved, "modules_to_save")
    return saved


def _wrap_saved(model: nn.Module, saved: list[tuple[str, nn.Module]], adapter_name: str) -> None:
    """Give each ``(path, module)`` of ``saved`` a trainable copy for ``adapter_name``."""
    for path, module in saved:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(adapter_name)
        wrapper.train(module.training)
        if wrapper is not module:
            replace_module(model, path, wrapper)


def _wrap_all(model: nn.Module, targets, cls: type, method: str, add, make=None) -> None:
    """Wrap each ``(path, module)`` in ``cls`` (reusing a wrapper of the same class) and call
    ``add(layer, path)``; everything is checked before anything changes."""
    _refuse_weight_read(model, targets, method)
    taken = [(p, m.method) for p, m in targets if isinstance(m, AdapterModule) and not isinstance(m, cls)]
    if taken:
        raise ValueError(f"{method} cannot go on modules that already carry another method's adapter: {taken[:5]}. "
                         f"Use one method per module (exclude_modules=[...] or other target names).")
    layers = [(path, module, (make or cls)(module) if not isinstance(module, cls) else module) for path, module in targets]
    added: list[tuple[AdapterModule, set]] = []
    try:
        for path, module, layer in layers:
            before = set(layer.adapter_names())
            added.append((layer, before))
            add(layer, path)
    except Exception:  # a layer refused the adapter (a rank its kind cannot take, ...): undo the others
        for layer, before in reversed(added):
            for name in set(layer.adapter_names()) - before:
                layer.remove_adapter(name)
        raise
    for path, module, layer in layers:
        layer.train(module.training)
        if layer is not module:
            replace_module(model, path, layer)


def _inject_ia3(model: nn.Module, config: IA3Config, adapter_name: str, loading: bool) -> IA3Config:
    if config.target_modules is None or config.feedforward_modules is None:  # PEFT's table per architecture
        try:
            targets, feedforward = default_targets(IA3_TARGETS, model, "IA3Config()", 'IA3Config(target_modules=['
                                                   '"k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])')
        except ValueError:
            if config.target_modules is None:
                raise
            targets, feedforward = config.target_modules, []  # named targets, no table: none feed-forward
        if config.target_modules is None:
            config = dataclasses.replace(config, target_modules=targets)
        if config.feedforward_modules is None:
            named = config.target_modules  # the targets that are (or end with) a feed-forward name of the table
            chosen = list(feedforward) if isinstance(named, str) else [
                n for n in named if any(n == f or n.endswith("." + f) for f in feedforward)]
            config = dataclasses.replace(config, feedforward_modules=chosen or None)
    targets = _select(model, config.target_modules, config.exclude_modules, config.modules_to_save)
    saved = _find_saved(model, config)
    unsupported = [(p, type(_unwrap(m)).__name__) for p, m in targets
                   if base_kind(_unwrap(m)) not in ("linear", "conv1d")
                   and _kind_class(_unwrap(m), IA3_LAYER_KINDS, None) is None]
    if unsupported:
        raise ValueError(f"target_modules selects modules (IA)^3 cannot scale: {unsupported[:5]}. It scales "
                         f"nn.Linear, transformers Conv1D and nn.Conv1d/2d/3d layers; narrow target_modules.")
    ff = config.feedforward_modules
    feedforward = {p for p, _ in targets if ff and _matches(ff, p)}
    fan_in_fan_out = _fan_in_fan_out(config, targets, "IA3Config")
    _wrap_all(model, targets, IA3Layer, "(IA)^3", lambda layer, path: layer.add_adapter(adapter_name, path in feedforward),
              make=lambda m: _kind_class(m, IA3_LAYER_KINDS, IA3Layer)(m))
    _note_float_layers(model, targets)
    _wrap_saved(model, saved, adapter_name)
    return dataclasses.replace(config, target_modules=sorted(p for p, _ in targets),
                               feedforward_modules=sorted(feedforward) or None, fan_in_fan_out=fan_in_fan_out)


def _inject_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str, loading: bool) -> BitFitConfig:
    if config.target_modules == "all":
        heads = output_heads(model)
        targets = [(p, m) for p, m in _user_modules(model)
                   if not (config.exclude_modules and _matches(config.exclude_modules, p))
                   and id(_unwrap(m)) not in heads and p.rsplit(".", 1)[-1] != "lm_head"
                   and (base_kind(_unwrap(m)) in ("linear", "conv1d")
                        or isinstance(getattr(_unwrap(m), "bias", None), nn.Parameter) and bias_size(_unwrap(m)))]
        if not targets:
            raise ValueError(f'BitFitConfig(target_modules="all") found no linear layer or biased module in '
                             f"{type(model).__name__}; name the modules instead.")
    else:
        targets = _select(model, config.target_modules, config.exclude_modules)
        unsupported = [(p, type(m).__name__) for p, m in targets if bias_size(_unwrap(m)) is None]
        if unsupported:
            raise ValueError(f"BitFit cannot give these modules a bias: {unsupported[:5]}. It handles nn.Linear, "
                             f"Conv1D and modules with a 1-d bias (LayerNorm); narrow target_modules.")
    _wrap_all(model, targets, BitFitLayer, "BitFit", lambda layer, path: layer.add_adapter(adapter_name))
    return dataclasses.replace(config, target_modules=sorted(p for p, _ in targets))


def _inject_bottleneck(model: nn.Module, config: BottleneckConfig, adapter_name: str, loading: bool) -> BottleneckConfig:
    ffn = _select(model, config.ffn_modules, each=False)
    attn = _select(model, config.attn_modules, each=False) if config.placement == "after_attn_and_ffn" else []
    _wrap_all(model, ffn + attn, BottleneckLayer, "a bottleneck adapter",
              lambda layer, path: layer.add_adapter(adapter_name, config.reduction_factor, config.activation))
    return dataclasses.replace(config, ffn_modules=sorted(p for p, _ in ffn),
                               attn_modules=sorted(p for p, _ in attn) or config.attn_modules)


_INJECTORS = {LoraConfig: _inject_lora, IA3Config: _inject_ia3, BitFitConfig: _inject_bitfit,
              BottleneckConfig: _inject_bottleneck, PromptTuningConfig: inject_prompt_learning,
              PrefixTuningConfig: inject_prompt_learning}


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name``; a layer left with no adapter gets its original module back.

    The remaining adapters keep their state; if the deleted one was active, the first remaining
    one becomes active (or none, when it was the last)."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(configs)}.")
    _refuse_if_merged(model, "delete an adapter")
    owner = adapter_owner(model)
    for path, module in reversed(list(adapter_modules(model))):  # inner first: nested wrappers unwind
        if adapter_name in module.adapter_names():
            module.remove_adapter(adapter_name)
        if not module.adapter_names():
            replacement = module.unwrapped()
            if replacement is None:  # a model-level module (prompt tuning): just remove it
                parent, _, child = path.rpartition(".")
                delattr(model.get_submodule(parent) if parent else model, child)
            else:
                replace_module(model, path, replacement)
    remaining = {k: v for k, v in configs.items() if k != adapter_name}
    object.__setattr__(owner, CONFIGS_ATTR, remaining)
    if remaining:
        set_adapter(model, next(iter(remaining)))
    return model


# ------------------------------------------------------------------------- switching, freezing
def _refuse_if_merged(model: nn.Module, action: str) -> None:
    merged = sorted({n for _, m in adapter_modules(model) for n in getattr(m, "merged", [])})
    if merged:
        raise RuntimeError(f"cannot {action}: adapters {merged} are merged into the base weights. "
                           f"Call lightning_peft.unmerge_adapters(model) first.")


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """``{state-dict name: parameter}`` of the tensors that train with adapter ``adapter_name``:
    its adapter tensors, its ``modules_to_save`` copies and the biases its ``bias`` setting frees."""
    config = adapter_configs(model)[adapter_name]
    owned = {id(t) for _, m in adapter_modules(model) if adapter_name in m.adapter_names()
             for t in m.trainable_tensors(adapter_name)}
    bias = getattr(config, "bias", "none")
    params = {}
    for name, param in model.named_parameters():
        is_bias = name.endswith("bias") and ".lora_" not in name and ".modules_to_save." not in name
        lora_bias = is_bias and name.endswith(".base_layer.bias")
        if id(param) in owned or (bias == "all" and is_bias) or (bias == "lora_only" and lora_bias):
            params[name] = param
    return params


def set_adapter(model: nn.Module, adapter_name: str, trainable: bool = True) -> nn.Module:
    """Make ``adapter_name`` the active adapter of every adapter module, and (with ``trainable``)
    the only thing that trains: its tensors get ``requires_grad=True``, every other parameter of
    the model (base weights, other adapters) ``False``."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(configs)}. "
                         f"Inject or load it first.")
    _refuse_if_merged(model, "switch adapters")
    for _, module in adapter_modules(model):
        module.active_adapter = adapter_name
    train = {id(p) for p in adapter_parameters(model, adapter_name).values()} if trainable else set()
    for param in model.parameters():
        if param.requires_grad != (id(param) in train):  # flip only what changes
            param.requires_grad_(not param.requires_grad)
    return model


@contextmanager
def _set_on_adapter_modules(model: nn.Module, attr: str, value):
    """Set ``attr`` on every adapter module for the block; restore each one's value on exit,
    also when the block raises."""
    modules = [m for _, m in adapter_modules(model)]
    previous = [getattr(m, attr) for m in modules]
    for module in modules:
        setattr(module, attr, value)
    try:
        yield model
    finally:
        for module, old in zip(modules, previous):
            setattr(module, attr, old)


@contextmanager
def use_adapter(model: nn.Module, adapter_name: str):
    """Within the block every adapter module runs ``adapter_name`` (frozen or not, nothing about
    training changes): e.g. a frozen reference adapter next to the policy being trained. The
    previous active adapters come back on exit, also when the block raises."""
    if adapter_name not in adapter_configs(model):
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(adapter_configs(model))}.")
    _refuse_if_merged(model, "switch adapters")
    with _set_on_adapter_modules(model, "active_adapter", adapter_name):
        yield model


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base function, bit for bit (the DPO/GRPO reference
    model, for free). The previous state comes back on exit, also when the block raises."""
    _refuse_if_merged(model, "disable adapters")
    with _set_on_adapter_modules(model, "disabled", True):
        yield model

