"""Adapter configurations, validated at construction.

Field names follow HF PEFT (``peft.LoraConfig``, ``peft.IA3Config``, ...) so that configs read
the same and ``adapter_config.json`` files round-trip between the two libraries. Defaults follow
the practical recipe (r=16, alpha=32, dropout 0.05, all linear layers), not PEFT's.

Every adapter config is an :class:`AdapterConfig`: a ``peft_type`` (the key of
``adapter_config.json`` that names the method: PEFT's ``"LORA"``, ``"IA3"``, ``"PROMPT_TUNING"``,
``"PREFIX_TUNING"``; ours ``"BITFIT"``, ``"BOTTLENECK"``), ``to_dict`` and ``from_dict``.
:func:`config_from_dict` picks the class from a file's ``peft_type``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch

TargetModules = Union[str, list[str], None]

INIT_CHOICES = (True, False, "gaussian", "pissa")
BIAS_CHOICES = ("none", "all", "lora_only")

# Fields of PEFT's adapter_config.json that carry no meaning for the adapter itself.
_PEFT_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                  "auto_mapping", "peft_version"}
# PEFT fields we do not implement, at the value that means "off" (PEFT writes every field).
_PEFT_OFF_VALUES = {"qalora_group_size": 16, "megatron_core": "megatron.core"}


def _check_regex(value: str, field_name: str) -> None:
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"{field_name}={value!r} is not a valid regular expression ({err}). Pass a list "
                         f"of module names, or a regex that `re.fullmatch` accepts.") from None


def _check_names(value: TargetModules, field_name: str) -> TargetModules:
    """Accept a regex string or a list of module names; tuples and sets become sorted lists."""
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            _check_regex(value, field_name)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{field_name} is an empty list: name at least one module, or pass None.")
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ValueError(f"{field_name} must be a regex string, a list of module names or None, "
                     f"got {type(value).__name__}: {value!r}.")


def _check_pattern(pattern: dict, field_name: str, kinds: tuple[type, ...]) -> dict:
    if not isinstance(pattern, dict):
        raise ValueError(f"{field_name} must be a dict of {{module regex: value}}, got {type(pattern).__name__}.")
    for key, value in pattern.items():
        _check_regex(key, f"{field_name} key")
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{field_name}[{key!r}]={value!r}: must be a positive number and finite"
                             f"{' (int)' if kinds == (int,) else ''}.")
    return dict(pattern)


def _check_layers(config) -> None:
    """``layers_to_transform`` / ``layers_pattern`` (PEFT's rules): an int or a list of ints, and a
    pattern only together with layer indices; not with a regex ``target_modules``."""
    layers, pattern = config.layers_to_transform, config.layers_pattern
    if isinstance(layers, (tuple, set, frozenset)):
        layers = config.layers_to_transform = sorted(layers)
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0 or (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers))):
        raise ValueError(f"layers_to_transform={layers!r}: give a layer index or a list of them (ints >= 0).")
    if isinstance(pattern, (tuple, set, frozenset)):
        pattern = config.layers_pattern = list(pattern)
    if pattern is not None and not (isinstance(pattern, str) or isinstance(pattern, list)
                                    and all(isinstance(p, str) for p in pattern)):
        raise ValueError(f"layers_pattern={pattern!r}: give the name of the layer list (e.g. \"layers\", \"h\") "
                         f"or a list of such names.")
    if pattern and layers is None:
        raise ValueError(f"layers_pattern={pattern!r} needs layers_to_transform: say which layer indices to adapt.")
    if layers is not None and isinstance(config.target_modules, str):
        raise ValueError(f"layers_to_transform cannot be used with a regex target_modules ({config.target_modules!r}): "
                         f"list the module names instead, or put the layer indices into the regex.")


def _check_token_indices(value):
    """``trainable_token_indices``: None, a non-empty list of token ids, or ``{module name: ids}``."""
    def ids(v, where):
        if isinstance(v, (tuple, set, frozenset)):
            v = sorted(v) if isinstance(v, (set, frozenset)) else list(v)
        if not isinstance(v, list) or not v or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                         for i in v):
            raise ValueError(f"trainable_token_indices{where}={v!r}: give a non-empty list of token ids (ints >= 0).")
        return v
    if value is None:
        return None
    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise ValueError(f"trainable_token_indices={value!r}: keys are embedding module names, e.g. "
                             f"{{'embed_tokens': [0, 5]}}.")
        return {k: ids(v, f"[{k!r}]") for k, v in value.items()}
    return ids(value, "")


class AdapterConfig(abc.ABC):
    """What every adapter config shares: ``peft_type``, ``to_dict`` (the ``adapter_config.json``
    content) and ``from_dict`` (ours or PEFT's file; unknown fields ignored with a warning)."""

    peft_type: ClassVar[str] = ""
    # the method's facts, read by the CLI, the callbacks and error messages (docs/architecture.md)
    display_name: ClassVar[str] = ""  # in messages and logs (ASCII)
    table_name: ClassVar[str] = ""  # in the CLI's tables (default: display_name)
    mergeable: ClassVar[bool] = True  # its adapters fold into the base weights (merge_adapters, export_merged)
    unmergeable_reason: ClassVar[str] = ""  # why not, when not mergeable ("adds virtual tokens")
    # our field name -> PEFT's, where they differ
    peft_names: ClassVar[dict[str, str]] = {}
    # PEFT fields this class lacks, at the value that means "off" (ignored without a warning)
    peft_off_values: ClassVar[dict[str, Any]] = {}

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, in PEFT's field names."""

    @classmethod
    def _from_peft(cls, data: dict[str, Any]) -> dict[str, Any]:
        """PEFT's field names (and values) to ours."""
        renamed = {peft: ours for ours, peft in cls.peft_names.items()}
        return {renamed.get(k, k): v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config"):
        """Build from an ``adapter_config.json`` dict (ours or PEFT's).

        Fields this class does not have are ignored: silently when they hold PEFT metadata or an
        empty/default value, with a warning naming them otherwise.
        """
        peft_type = data.get("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ValueError(f"{source}: peft_type={peft_type!r}, expected {cls.peft_type!r}.")
        data = cls._from_peft(dict(data))
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in data.items() if k in known}
        off = {**_PEFT_OFF_VALUES, **cls.peft_off_values}
        ignored = {k: v for k, v in data.items()
                   if k not in known and k not in _PEFT_METADATA
                   and v not in (None, False, {}, [], "") and v != off.get(k, object())}
        if ignored:
            warnings.warn(f"{source}: fields not supported by lightning-peft were ignored: {ignored}. "
                          f"The adapter may behave differently than where it was trained.", stacklevel=3)
        return cls(**kwargs)


def _check_positive_int(value, field_name: str, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field_name}={value!r}: must be a positive int{hint}.")


def _check_choice(value, field_name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}={value!r}: choose one of {list(choices)}.")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (and rsLoRA, DoRA, PiSSA init) hyper-parameters.

    The update of a wrapped weight ``W`` (``[out, in]``) is ``s * B @ A`` with ``A: [r, in]``,
    ``B: [out, r]`` and ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

    Args:
        r: rank of the update (``rank_pattern`` overrides it per module).
        lora_alpha: numerator of the scaling (``alpha_pattern`` overrides it per module).
        lora_dropout: dropout on the adapter branch input.
        target_modules: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head), a
            list of module names (exact name or dotted suffix, e.g. ``"q_proj"``), a regex that
            must match the full module name, or None: PEFT's default for the model's architecture
            (``config.model_type``: ``["q_proj", "v_proj"]`` for Llama, ``["c_attn"]`` for GPT-2, ...).
        exclude_modules: same forms as ``target_modules``; matches are never adapted.
        use_rslora: scale by ``alpha / sqrt(r)`` (stable at high rank).
        use_dora: DoRA, a learned magnitude per output row over the normalised ``W + s B A``.
        init_lora_weights: ``True`` (Kaiming A, zero B: starts as the base model), ``"gaussian"``
            (A ~ N(0, 1/r)), ``"pissa"`` (top-r SVD of W into A/B, residual kept in the base) or
            ``False`` (random B too: the adapter changes the output from the start; for tests).
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted layers).
        modules_to_save: modules (names or suffixes) trained fully, as per-adapter copies.
        rank_pattern / alpha_pattern: ``{module regex: value}``; a key matches a module whose
            name ends with it (PEFT's rule ``(.*\\.)?(key)$``).
        fan_in_fan_out: the base stores ``[in, out]`` (GPT-2 ``Conv1D``). It follows the layer
            kind, as in PEFT: set for ``Conv1D`` layers, and a ``True`` on ``nn.Linear`` layers
            (which store ``[out, in]``) is corrected to ``False`` with a warning.
        layers_to_transform: adapt only the targets in these layers (an index or a list), the
            layer index being the number after ``layers_pattern`` in the module path
            (``model.layers.3.self_attn.q_proj`` is layer 3), or the first number in the path
            when ``layers_pattern`` is None. Needs a list ``target_modules``.
        layers_pattern: the name(s) of the layer list (``"layers"``, ``"h"``, ``"blocks"``).
        lora_bias: ``lora_B`` gets a trainable bias (PEFT's ``lora_bias``); merging adds
            ``s * bias`` to the base bias. Not with DoRA, embeddings or mixed-adapter batches.
        target_parameters: parameters to adapt directly, ``"<module path>.<parameter>"`` (exact
            or a dotted suffix, e.g. ``"experts.gate_up_proj"``): 2-D ``[out, in]`` or 3-D
            ``[experts, out, in]`` (MoE experts stored as one tensor; one rank-``r`` update per
            expert). The update is added to the weight in the forward, so it needs
            ``lora_dropout=0`` and no DoRA / ``lora_bias`` (as in PEFT). With ``target_modules=None``
            only the parameters are adapted.
        trainable_token_indices: rows of an embedding that train (new special tokens): a list of
            token ids (the model's input embedding) or ``{embedding name: [ids]}``. Only those rows
            train and are saved; an output head tied to the embedding follows them (as in PEFT).
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: TargetModules = "all-linear"
    exclude_modules: TargetModules = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Union[bool, str] = True
    bias: str = "none"
    modules_to_save: Union[list[str], None] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    layers_to_transform: Union[int, list[int], None] = None
    layers_pattern: Union[str, list[str], None] = None
    lora_bias: bool = False
    target_parameters: Union[list[str], None] = None
    trainable_token_indices: Union[list[int], dict, None] = None

    peft_type = "LORA"
    display_name = "LoRA"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: the rank must be a positive int (8-64 covers most tasks).")
        if (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: must be a positive number and finite (the recipe uses 2 * r).")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: must be in [0, 1).")
        if self.target_modules == [] and self.target_parameters:
            self.target_modules = None  # PEFT writes [] when it adapts parameters only
        self.target_modules = _check_names(self.target_modules, "target_modules")
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules")
        if self.init_lora_weights not in INIT_CHOICES or (
                isinstance(self.init_lora_weights, int) and not isinstance(self.init_lora_weights, bool)):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r}: choose one of {list(INIT_CHOICES)}.")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias={self.bias!r}: choose one of {list(BIAS_CHOICES)}.")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names(self.modules_to_save, "modules_to_save")
        self.rank_pattern = _check_pattern(self.rank_pattern, "rank_pattern", (int,))
        self.alpha_pattern = _check_pattern(self.alpha_pattern, "alpha_pattern", (int, float))
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r}: must be True or False.")
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True with use_dora=True: PEFT does not combine them either; pick one.")
        self.trainable_token_indices = _check_token_indices(self.trainable_token_indices)
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        if self.target_parameters is not None:
            self.target_parameters = _check_names(list(self.target_parameters), "target_parameters")
            fixes = {"lora_dropout": 0.0, "use_dora": False, "lora_bias": False}
            wrong = [f"{k}={getattr(self, k)!r}" for k in fixes if getattr(self, k)]
            if wrong:
                raise ValueError(f"target_parameters={self.target_parameters} adds the update to the weight itself, so "
                                 f"it cannot take {', '.join(wrong)} (as in PEFT): set "
                                 f"{', '.join(f'{k}={fixes[k]!r}' for k in fixes if getattr(self, k))}.")
        _check_layers(self)

    # ----------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content: PEFT's always-present fields, plus the optional
        ones only when they differ from their default (older PEFT rejects fields it does not know)."""
        out: dict[str, Any] = {"peft_type": self.peft_type, "task_type": None, "r": self.r,
                               "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                               "target_modules": self.target_modules, "bias": self.bias,
                               "fan_in_fan_out": self.fan_in_fan_out,
                               "init_lora_weights": self.init_lora_weights,
                               "modules_to_save": self.modules_to_save,
                               "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern}
        for name in ("use_rslora", "use_dora", "exclude_modules", "layers_pattern", "lora_bias", "target_parameters",
                     "trainable_token_indices"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.layers_to_transform is not None:
            out["layers_to_transform"] = self.layers_to_transform
        return out


@dataclass
class IA3Config(AdapterConfig):
    r"""(IA)^3: a learned vector rescales each channel of the targeted layers, initialised to ones.

        attention-style target (output scaling):  y = l * (W x + b),     l: [out]
        feed-forward target (input scaling):      y = W (l * x) + b,     l: [in]

    as in HF PEFT (``ia3_l`` of shape ``[out, 1]`` / ``[1, in]`` in the file). At init the model is
    the base model exactly; merging multiplies ``l`` into the weight (and bias).

    Args:
        target_modules: names, dotted suffixes or a regex (as in :class:`LoraConfig`), or
            ``"all-linear"``. The default (None) is PEFT's choice for the model's architecture
            (``config.model_type``): keys, values and the FFN's down projection for Llama
            (``["k_proj", "v_proj", "down_proj"]``), ``["q_proj", "v_proj", "down_proj"]`` for
            Qwen2 / Gemma, ``["c_attn", "mlp.c_proj"]`` for GPT-2, ``["q_proj", "k_proj", "fc2"]``
            for OPT, ...; a model outside that table needs the names.
        feedforward_modules: the subset of ``target_modules`` scaled on the input side (the FFN's
            second layer in the paper); names in it must appear in ``target_modules``. None: the
            architecture's feed-forward modules in PEFT's table that are targeted (``down_proj``
            for Llama), none for a model outside the table.
        exclude_modules: matches are never adapted.
        fan_in_fan_out: the base stores ``[in, out]``; set automatically for ``Conv1D`` layers.
        modules_to_save: modules (names or suffixes) trained fully, as per-adapter copies.
    """

    target_modules: TargetModules = None
    feedforward_modules: TargetModules = None
    exclude_modules: TargetModules = None
    fan_in_fan_out: bool = False
    modules_to_save: Union[list[str], None] = None

    peft_type = "IA3"
    display_name = "(IA)^3"
    table_name = "(IA)³"
    peft_off_values = {"init_ia3_weights": True}

    def __post_init__(self) -> None:
        self.target_modules = _check_names(self.target_modules, "target_modules")
        self.feedforward_modules = _check_names(self.feedforward_modules or None, "feedforward_modules")
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            stray = [n for n in self.feedforward_modules if n not in self.target_modules]
            if stray:
                raise ValueError(f"feedforward_modules {stray} are not in target_modules {self.target_modules}: "
                                 f"feed-forward modules are a subset of the targets; add them there too.")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"fan_in_fan_out={self.fan_in_fan_out!r}: must be True or False.")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names(self.modules_to_save, "modules_to_save")

    def to_dict(self) -> dict[str, Any]:
        out = {"peft_type": self.peft_type, "task_type": None, "target_modules": self.target_modules,
               "feedforward_modules": self.feedforward_modules or [],  # PEFT refuses null
               "fan_in_fan_out": self.fan_in_fan_out,
               "init_ia3_weights": True, "modules_to_save": self.modules_to_save}
        if self.exclude_modules:
            out["exclude_modules"] = self.exclude_modules
        return out


@dataclass
class BitFitConfig(AdapterConfig):
    r"""BitFit: only bias terms train. ``y = f(x) + d`` for each targeted module ``f`` with a
    learned shift ``d: [out]`` initialised to zero, i.e. its bias becomes ``b + d``; a layer
    without a bias (Llama's projections) gets one this way. The base tensors are not touched;
    merging adds ``d`` to the bias (creating it where there was none).

    Args:
        target_modules: ``"all"``: every ``nn.Linear`` / ``Conv1D`` but the output head, plus every
            other module with a 1-d ``bias`` (LayerNorm); or names, dotted suffixes, a regex.
        exclude_modules: matches are never adapted.

    Files use our own keys (no PEFT equivalent): ``peft_type: "BITFIT"`` and
    ``base_model.model.<module path>.bitfit_bias`` (the shift ``d``, ``[out]``).
    """

    target_modules: TargetModules = "all"
    exclude_modules: TargetModules = None

    peft_type = "BITFIT"
    display_name = "BitFit"

    def __post_init__(self) -> None:
        if self.target_modules is None:
            raise ValueError('target_modules=None: use "all" or name the modules whose bias should train.')
        self.target_modules = _check_names(self.target_modules, "target_modules")
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules")

    def to_dict(self) -> dict[str, Any]:
        out = {"peft_type": self.peft_type, "task_type": None, "target_modules": self.target_modules}
        if self.exclude_modules:
            out["exclude_modules"] = self.exclude_modules
        return out


PROMPT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}  # ours -> PEFT's prompt_tuning_init


@dataclass
class PromptTuningConfig(AdapterConfig):
    r"""Prompt tuning: ``num_virtual_tokens`` learned input embeddings ``P: [T, dim]`` prepended to
    every sequence, ``inputs_embeds <- [P; E(input_ids)]``; the attention mask gets ``T`` ones in
    front and the labels ``T`` ignored positions (-100). As in HF PEFT, a causal LM's logits then
    include the ``T`` virtual positions: ``logits[:, T:]`` are the real tokens'.

    Args:
        num_virtual_tokens: ``T``.
        init: ``"random"`` (N(0, 1), PEFT's RANDOM), ``"vocab"`` (embeddings of random vocabulary
            tokens, PEFT's SAMPLE_VOCAB) or any other string: a text whose token embeddings,
            repeated or cut to ``T``, start the prompt (needs ``tokenizer``).
        tokenizer: for a text ``init``: a tokenizer with ``encode(text) -> ids`` (not saved; its
            ``name_or_path`` is written as PEFT's ``tokenizer_name_or_path``).
        token_dim: embedding width; filled in from the model at injection.
        task_type: PEFT's task type, written to the file (PEFT's prompt-learning forward needs it).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    tokenizer: Any = field(default=None, repr=False, compare=False)
    token_dim: Union[int, None] = None
    task_type: str = "CAUSAL_LM"

    peft_type = "PROMPT_TUNING"
    display_name = "prompt tuning"
    mergeable = False
    unmergeable_reason = "adds virtual tokens"
    peft_off_values = {"num_transformer_submodules": 1}

    def __post_init__(self) -> None:
        _check_positive_int(self.num_virtual_tokens, "num_virtual_tokens", " (8-100 virtual tokens are typical)")
        if not isinstance(self.init, str) or not self.init:
            raise ValueError(f'init={self.init!r}: use "random", "vocab" or a non-empty text (with tokenizer=...).')

    def to_dict(self) -> dict[str, Any]:
        text = self.init if self.init not in PROMPT_INITS else None
        name = getattr(self.tokenizer, "name_or_path", None) or None
        # PEFT refuses TEXT without a tokenizer name; the init does not matter once weights exist
        init = PROMPT_INITS.get(self.init, "TEXT" if name else "RANDOM")
        return {"peft_type": self.peft_type, "task_type": self.task_type,
                "num_virtual_tokens": self.num_virtual_tokens, "token_dim": self.token_dim,
                "num_transformer_submodules": 1, "prompt_tuning_init": init,
                "prompt_tuning_init_text": text if init == "TEXT" else None,
                "tokenizer_name_or_path": name if init == "TEXT" else None}

    @classmethod
    def _from_peft(cls, data: dict[str, Any]) -> dict[str, Any]:
        peft_init = data.pop("prompt_tuning_init", "RANDOM")
        text = data.pop("prompt_tuning_init_text", None)
        data.pop("tokenizer_name_or_path", None)
        if "init" not in data:
            ours = {v: k for k, v in PROMPT_INITS.items()}
            data["init"] = text if peft_init == "TEXT" and text else ours.get(peft_init, "random")
        for key in ("num_layers", "num_attention_heads"):  # model facts PEFT records; unused here
            data.pop(key, None)
        return data


@dataclass
class PrefixTuningConfig(AdapterConfig):
    r"""Prefix tuning: ``num_virtual_tokens`` learned key/value vectors per layer, seen by every
    attention layer as a cache of ``T`` earlier positions (through the model's past key values).

        P: [T, num_layers * 2 * token_dim]    layer l: keys P[:, 2l], values P[:, 2l+1],
                                              each viewed as [heads, T, token_dim / heads]

    With ``projection`` the prefix is reparameterised while training,
    ``P = MLP(E)``, ``E: [T, token_dim]``, ``MLP = Linear(token_dim, encoder_hidden_size) -> tanh ->
    Linear(.., num_layers * 2 * token_dim)``; only ``P`` is saved (the MLP is dropped, as in PEFT),
    and a loaded adapter holds ``P`` directly.

    Args:
        num_virtual_tokens: ``T``.
        projection: reparameterise through the MLP (PEFT's ``prefix_projection``).
        encoder_hidden_size: the MLP's width (default ``token_dim``).
        token_dim, num_layers, num_attention_heads: filled in from the model at injection; with
            grouped-query attention ``token_dim = head_dim * num_key_value_heads`` and the heads are
            the key/value heads (PEFT's rule).
        task_type: PEFT's task type, written to the file.
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: Union[int, None] = None
    token_dim: Union[int, None] = None
    num_layers: Union[int, None] = None
    num_attention_heads: Union[int, None] = None
    task_type: str = "CAUSAL_LM"

    peft_type = "PREFIX_TUNING"
    display_name = "prefix tuning"
    mergeable = False
    unmergeable_reason = "adds virtual keys and values"
    peft_names = {"projection": "prefix_projection"}
    peft_off_values = {"num_transformer_submodules": 1}

    def __post_init__(self) -> None:
        _check_positive_int(self.num_virtual_tokens, "num_virtual_tokens", " (10-30 virtual tokens are typical)")
        if not isinstance(self.projection, bool):
            raise ValueError(f"projection={self.projection!r}: must be True or False.")
        for name in ("encoder_hidden_size", "token_dim", "num_layers", "num_attention_heads"):
            if getattr(self, name) is not None:
                _check_positive_int(getattr(self, name), name, " or None (filled in from the model)")

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task_type": self.task_type,
                "num_virtual_tokens": self.num_virtual_tokens, "prefix_projection": self.projection,
                "encoder_hidden_size": self.encoder_hidden_size, "token_dim": self.token_dim,
                "num_layers": self.num_layers, "num_attention_heads": self.num_attention_heads,
                "num_transformer_submodules": 1}


ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
PLACEMENTS = ("after_ffn", "after_attn_and_ffn")


@dataclass
class BottleneckConfig(AdapterConfig):
    r"""Serial bottleneck adapters (Houlsby / Pfeiffer): after each targeted sub-layer ``f``,

        h = f(x);   h <- h + U act(D h + c) + e,     D: [d / reduction_factor, d],  U: [d, d / rf]

    with ``U`` and ``e`` zero-initialised, so training starts at the base model. ``"after_ffn"``
    (Pfeiffer) adapts the feed-forward blocks; ``"after_attn_and_ffn"`` (Houlsby) the attention
    blocks too. The sub-layer's output (the first element of a tuple) is adapted before the
    residual addition of the surrounding block. Not mergeable (the activation is nonlinear).

    Args:
        reduction_factor: ``d / bottleneck width`` (at least one unit).
        placement: ``"after_ffn"`` or ``"after_attn_and_ffn"``.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        ffn_modules / attn_modules: names or dotted suffixes (or a regex) of the feed-forward and
            attention blocks; the defaults fit Llama-style (``mlp``, ``self_attn``) and GPT-2
            (``mlp``, ``attn``) models. At least one module must match each list in use.

    Files use our own keys (no PEFT equivalent): ``peft_type: "BOTTLENECK"`` and, under
    ``base_model.model.<block path>.``, ``adapter_down.weight`` / ``.bias`` and
    ``adapter_up.weight`` / ``.bias``.
    """

    reduction_factor: int = 16
    placement: str = "after_ffn"
    activation: str = "relu"
    ffn_modules: TargetModules = field(default_factory=lambda: ["mlp"])
    attn_modules: TargetModules = field(default_factory=lambda: ["self_attn", "attn"])

    peft_type = "BOTTLENECK"
    display_name = "bottleneck adapters"
    mergeable = False
    unmergeable_reason = "is a nonlinear block"

    def __post_init__(self) -> None:
        _check_positive_int(self.reduction_factor, "reduction_factor", " (16 is the usual choice)")
        _check_choice(self.placement, "placement", PLACEMENTS)
        _check_choice(self.activation, "activation", ACTIVATIONS)
        self.ffn_modules = _check_names(self.ffn_modules, "ffn_modules")
        self.attn_modules = _check_names(self.attn_modules, "attn_modules")
        if self.ffn_modules is None:
            raise ValueError('ffn_modules=None: name the feed-forward blocks, e.g. ["mlp"].')
        if self.placement == "after_attn_and_ffn" and self.attn_modules is None:
            raise ValueError('placement="after_attn_and_ffn" needs attn_modules, e.g. ["self_attn"].')

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task_type": None, "reduction_factor": self.reduction_factor,
                "placement": self.placement, "activation": self.activation, "ffn_modules": self.ffn_modules,
                "attn_modules": self.attn_modules}


CONFIG_TYPES = {cls.peft_type: cls for cls in (LoraConfig, IA3Config, BitFitConfig, PromptTuningConfig,
                                                PrefixTuningConfig, BottleneckConfig)}


def config_from_dict(data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
    """The config an ``adapter_config.json`` dict describes, by its ``peft_type`` (LoRA if absent)."""
    peft_type = data.get("peft_type", LoraConfig.peft_type)
    if not isinstance(peft_type, str) or peft_type not in CONFIG_TYPES:
        raise ValueError(f"{source}: peft_type={peft_type!r} is not supported by lightning-peft; it reads "
                         f"{sorted(CONFIG_TYPES)}. Train the adapter with one of those methods.")
    return CONFIG_TYPES[peft_type].from_dict(data, source)


QUANT_TYPES = ("nf4", "fp4", "int8")


@dataclass
class QuantConfig:
    """How :func:`lightning_peft.quantize_base` freezes the base model's linear layers.

    Args:
        quant_type: ``"nf4"`` (4-bit NormalFloat, the QLoRA default), ``"fp4"``, or ``"int8"``
            (LLM.int8 row-wise absmax, bitsandbytes ``Linear8bitLt``).
        double_quant: quantize the per-block absmax constants too (4-bit only):
            ~4.127 bits/param instead of 4.5.
        compute_dtype: dtype of the dequantized weight in the matmul (4-bit only).
        blocksize: values per absmax block (4-bit only): 64 (default), 128, 256, ... 4096.
        skip_modules: names or dotted suffixes of linear layers kept in float (the output head).
        quant_storage: dtype the packed 4-bit bytes are stored in; FSDP needs it to match the
            dtype of the float parameters it flattens with them.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    blocksize: int = 64
    skip_modules: tuple = ("lm_head",)
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r}: choose one of {list(QUANT_TYPES)}.")
        if not isinstance(self.compute_dtype, torch.dtype) or not self.compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: use a float torch dtype "
                             f"(torch.bfloat16, torch.float16 or torch.float32).")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize={self.blocksize!r}: choose a power of two from 32 to 4096 (default 64).")
        if isinstance(self.skip_modules, str):
            self.skip_modules = (self.skip_modules,)
        self.skip_modules = tuple(self.skip_modules or ())
        if not isinstance(self.quant_storage, torch.dtype):
            raise ValueError(f"quant_storage={self.quant_storage!r}: must be a torch dtype (torch.uint8 by "
                             f"default; the float dtype of the model's other parameters under FSDP).")

    @property
    def is_4bit(self) -> bool:
        return self.quant_type in ("nf4", "fp4")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (dtypes as names), for checkpoints and export manifests."""
        return {"quant_type": self.quant_type, "double_quant": self.double_quant,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."), "blocksize": self.blocksize,
                "skip_modules": list(self.skip_modules),
                "quant_storage": str(self.quant_storage).removeprefix("torch.")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        dtypes = {k: getattr(torch, data[k]) for k in ("compute_dtype", "quant_storage") if k in data}
        return cls(**{**data, **dtypes})
