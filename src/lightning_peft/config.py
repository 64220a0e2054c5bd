"""Adapter configurations, validated at construction.

Field names follow HF PEFT (``peft.LoraConfig``) so that configs read the same and
``adapter_config.json`` files round-trip between the two libraries. Defaults follow the
practical recipe (r=16, alpha=32, dropout 0.05, all linear layers), not PEFT's.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Union

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
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            raise ValueError(f"{field_name}[{key!r}]={value!r}: must be a positive number"
                             f"{' (int)' if kinds == (int,) else ''}.")
    return dict(pattern)


@dataclass
class LoraConfig:
    """LoRA (and rsLoRA, DoRA, PiSSA init) hyper-parameters.

    The update of a wrapped weight ``W`` (``[out, in]``) is ``s * B @ A`` with ``A: [r, in]``,
    ``B: [out, r]`` and ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

    Args:
        r: rank of the update (``rank_pattern`` overrides it per module).
        lora_alpha: numerator of the scaling (``alpha_pattern`` overrides it per module).
        lora_dropout: dropout on the adapter branch input.
        target_modules: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` but the output head), a
            list of module names (exact name or dotted suffix, e.g. ``"q_proj"``), or a regex that
            must match the full module name.
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
        fan_in_fan_out: the base stores ``[in, out]`` (GPT-2 ``Conv1D``); set automatically for
            ``Conv1D`` layers, only needed for ``nn.Linear`` layers stored transposed.
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

    peft_type = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: the rank must be a positive int (8-64 covers most tasks).")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: must be a positive number (the recipe uses 2 * r).")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: must be in [0, 1).")
        if self.target_modules is None:
            raise ValueError('target_modules=None: name the layers to adapt, e.g. "all-linear" or ["q_proj", "v_proj"].')
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
            self.modules_to_save = _check_names(list(self.modules_to_save), "modules_to_save")
        self.rank_pattern = _check_pattern(self.rank_pattern, "rank_pattern", (int,))
        self.alpha_pattern = _check_pattern(self.alpha_pattern, "alpha_pattern", (int, float))
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r}: must be True or False.")

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
        for name in ("use_rslora", "use_dora", "exclude_modules"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        """Build from an ``adapter_config.json`` dict (ours or PEFT's).

        Fields this class does not have are ignored: silently when they hold PEFT metadata or an
        empty/default value, with a warning naming them otherwise.
        """
        peft_type = data.get("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ValueError(f"{source}: peft_type={peft_type!r}, expected {cls.peft_type!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        ignored = {k: v for k, v in data.items()
                   if k not in known and k not in _PEFT_METADATA
                   and v not in (None, False, {}, [], "") and v != _PEFT_OFF_VALUES.get(k)}
        if ignored:
            warnings.warn(f"{source}: fields not supported by lightning-peft were ignored: {ignored}. "
                          f"The adapter may behave differently than where it was trained.", stacklevel=3)
        return cls(**kwargs)


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
