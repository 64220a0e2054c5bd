r"""``lightning-peft``: train from a config, look inside an adapter, export a merged model, run the demo.

    lightning-peft fit --config examples/configs/qlora.yaml      # LightningCLI; also validate/test/predict
    lightning-peft inspect adapters/last                         # config, tensor counts, LoRA rank spectra
    lightning-peft merge --base ./llama --adapter adapters/last --out merged [--dtype bfloat16]
    lightning-peft demo [--fast] [--out DIR]

``fit`` (and ``validate``/``test``/``predict``) is Lightning's own ``LightningCLI`` (jsonargparse):
any LightningModule by import path (``--model=pkg.Class`` or ``model.class_path``; default
``lightning_peft.CausalLMModule``, and ``lightning_peft.data.ChatDataModule`` for ``data``), any Trainer
argument (``--trainer.strategy=qlora``: the names are registered on ``import lightning_peft``,
which runs before parsing), callbacks as ``trainer.callbacks`` entries. A ``RichProgressBar`` is
added unless the config chose a progress bar or ``enable_progress_bar: false``.

``inspect`` reads an adapter directory of any method (HF PEFT format, or our BitFit / bottleneck
keys) without the base model: the config, and the tensors counted per kind and per module. A save
with further named adapters in sub-folders (AdapterCheckpoint's and PEFT's layout) is listed, then
each adapter is shown. For each LoRA layer it also reports the singular values of ``s B A`` (two
thin QRs and an ``r x r`` SVD, as :class:`~lightning_peft.callbacks.RankMonitor` does) and the
effective rank: the smallest ``k`` whose top-``k`` squared singular values hold ``energy`` (0.9)
of their sum. ``s`` is ``alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA), with ``alpha`` from
``alpha_pattern``.

Bad input (a missing directory, a directory that is not an adapter, a malformed or corrupted
adapter file, a base that cannot be found; for ``fit`` & co. a checkpoint that cannot be read or is
refused, a config value lightning-peft rejects) ends with one line on stderr,
``lightning-peft <command>: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from . import __version__
from .checkpoint import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, _read_weights, load_adapter, read_adapter_config
from .config import CONFIG_TYPES, QUANT_TYPES, AdapterConfig, LoraConfig, QuantConfig
from .inject import _matches, _pattern_value
from .merge import MANIFEST_NAME, export_merged
from .methods.lora import lora_scaling
from .quantize import quantize_base
from .spectrum import TOP_VALUES_SHOWN, effective_rank, factor_singular_values
from .tables import name_width, shorten_names

# Lightning (fit & co., a LightningModule as --base), transformers (a model directory as --base) and
# bitsandbytes (--quantize) are imported by the command that needs them: --help and inspect start
# in about the time of ``import torch``.
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def __getattr__(name: str):  # names that need Lightning, built on first use
    if name == "PEFTLightningCLI":
        return _lightning_cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
EXIT_USAGE = 2


class CLIError(Exception):
    """Bad input the user can fix; printed as one line, no traceback."""


# Errors of the library that describe bad input (docs/architecture.md, "Errors"): printed, not traced back.
USER_ERRORS = (CLIError, OSError, ValueError, ImportError)


# ------------------------------------------------------------------------------------ fit & co.
# the classes of `model` / `data` when a config or the command line names none (`class_path`)
DEFAULT_MODEL = "lightning_peft.CausalLMModule"
DEFAULT_DATA = "lightning_peft.data.ChatDataModule"
_CLI_CLASS: list = []


def _lightning_cli_class():
    """``PEFTLightningCLI``: defined on first use, as it subclasses Lightning's ``LightningCLI``."""
    if _CLI_CLASS:
        return _CLI_CLASS[0]
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
    from lightning.pytorch.cli import LightningCLI

    class PEFTLightningCLI(LightningCLI):
        """``LightningCLI`` with a ``RichProgressBar`` unless the config picked a progress bar or
        turned it off (a second progress bar, or one with ``enable_progress_bar=False``, is an error
        in Lightning, so the default cannot simply be appended). ``model`` and ``data`` default to
        :class:`~lightning_peft.CausalLMModule` and :class:`~lightning_peft.data.ChatDataModule`:
        ``--model.base DIR --data.train FILE.jsonl`` is a whole fine-tune."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}})

        def before_instantiate_classes(self) -> None:
            """The default ``data`` is left out when nothing was said about it (no ``--data.train``) and
            the model is not the default one: a LightningModule with its own dataloaders runs as before."""
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            data, model = config.get("data"), config.get("model")
            if (data is not None and data.get("class_path") == DEFAULT_DATA
                    and (data.get("init_args") or {}).get("train") is None and model is not None
                    and model.get("class_path") != DEFAULT_MODEL):
                config["data"] = None

        def instantiate_trainer(self, **kwargs: Any):
            config = self._get(self.config_init, "trainer", default={})
            callbacks = config.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, RichProgressBar()]
            return super().instantiate_trainer(**kwargs)

        def _parse_ckpt_path(self) -> None:
            """Lightning reads ``ckpt_path``'s hyper-parameters here, before any Trainer exists. Our
            loader reads it first, so that a refused checkpoint (a pickle that would run code) or an
            unreadable one is one clear error naming the file."""
            from .checkpoint import load_checkpoint_file

            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and Path(ckpt_path).is_file():
                load_checkpoint_file(ckpt_path)
            super()._parse_ckpt_path()

    PEFTLightningCLI.__module__ = __name__
    _CLI_CLASS.append(PEFTLightningCLI)
    return PEFTLightningCLI


def run_lightning(argv: list[str], from_sys_argv: bool = False) -> int:
    """``lightning-peft fit|validate|test|predict ...``: Lightning's CLI, lightning-peft's names registered.
    ``from_sys_argv``: ``argv`` is ``sys.argv[1:]`` (LightningCLI then reads it itself; it warns
    when given both)."""
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE

    if not _JSONARGPARSE_SIGNATURES_AVAILABLE:
        print(f"lightning-peft {argv[0]}: error: LightningCLI needs jsonargparse: pip install "
              f"'jsonargparse[signatures]>=4.39'", file=sys.stderr)
        return EXIT_USAGE
    try:
        _lightning_cli_class()(args=None if from_sys_argv else argv, parser_kwargs={"prog": "lightning-peft"})
    except USER_ERRORS as err:
        if not _about_input(err):
            raise  # an error of the LightningModule's own code keeps its traceback
        print(f"lightning-peft {argv[0]}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


_PACKAGE_DIR = Path(__file__).resolve().parent


def _about_input(err: BaseException) -> bool:
    """Whether ``err`` describes bad input rather than a bug: a file that cannot be read (any
    ``OSError``), or an error raised by lightning-peft itself (a refused checkpoint, a config value,
    an adapter that does not fit). ``ValueError`` raised in a LightningModule is not."""
    if isinstance(err, (CLIError, OSError)):
        return True
    tb, filename = err.__traceback__, ""
    while tb is not None:
        filename, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return Path(filename).resolve().is_relative_to(_PACKAGE_DIR)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ------------------------------------------------------------------------------------- inspect
@dataclass
class LayerSpectrum:
    """One LoRA layer of an adapter file: ``singular_values`` of ``scaling * B @ A``, descending, ``[r]``."""

    path: str
    r: int
    scaling: float
    singular_values: torch.Tensor
    effective_rank: int


@dataclass
class AdapterSummary:
    """What ``lightning-peft inspect`` prints for one adapter directory.

    ``name``: None for the adapter at the top of the directory, else the sub-folder's name (a
    further named adapter). ``method``: the file's ``peft_type``. ``counts``: ``{kind: (tensors,
    parameters, bytes)}`` with the kinds of :data:`KINDS`. ``modules``: ``{module path with layer
    numbers as *: (modules, tensors, parameters, bytes)}`` (``(model)`` for the model-level
    prompt / prefix tensor). ``layers``: the LoRA rank spectra (empty for the other methods)."""

    directory: Path
    config: dict[str, Any]
    counts: dict[str, tuple[int, int, int]]
    layers: list[LayerSpectrum]
    energy: float
    name: str | None = None
    method: str = "LORA"
    modules: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


# key suffix -> kind; one kind per tensor of each method (the file formats of docs/methods.md)
_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_embedding_A": "lora_A", ".lora_B.weight": "lora_B",
             ".lora_embedding_B": "lora_B", ".lora_magnitude_vector": "magnitude", ".ia3_l": "ia3_l",
             ".bitfit_bias": "bitfit_bias", ".adapter_down.weight": "adapter_down",
             ".adapter_down.bias": "adapter_down", ".adapter_up.weight": "adapter_up", ".adapter_up.bias": "adapter_up"}
PROMPT_KEY = "prompt_embeddings"  # prompt and prefix tuning: one model-level tensor, no module path
KINDS = ("lora_A", "lora_B", "magnitude", "ia3_l", "bitfit_bias", "adapter_down", "adapter_up", PROMPT_KEY,
         "modules_to_save", "bias", "other")
# peft_type -> how the tables name the method (the config classes' table_name / display_name)
METHODS = {peft_type: cls.table_name or cls.display_name for peft_type, cls in CONFIG_TYPES.items()}
MODEL_LEVEL = "(model)"


def _kind(key: str, config: AdapterConfig) -> tuple[str, str]:
    """``(kind, module path)`` of a key of an adapter file (without PEFT's ``base_model.model.``)."""
    if key == PROMPT_KEY:
        return PROMPT_KEY, MODEL_LEVEL
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            return kind, key[: -len(suffix)]
    path = key.rsplit(".", 1)[0]
    saved = getattr(config, "modules_to_save", None)
    if saved and _matches(saved, path.replace(".modules_to_save", "")):
        return "modules_to_save", path.replace(".modules_to_save", "")
    return ("bias" if key.endswith(".bias") else "other"), path.removesuffix(".base_layer")


def _natural(path: str) -> list:
    """Sort key: ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _module_group(path: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.*.mlp``: one row per kind of module, not per layer."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", path)


def adapter_directory(path: str | Path, flag: str = "") -> Path:
    """``path`` if it is an adapter directory (``adapter_config.json`` and weights), else a one-line :class:`CLIError`."""
    directory = Path(path)
    name = f"{flag} {directory}" if flag else str(directory)
    if not directory.exists():
        raise CLIError(f"{name}: no such directory.")
    if not directory.is_dir():
        raise CLIError(f"{name} is a file; give the adapter directory (adapter_config.json + {WEIGHTS_NAME}).")
    if not (directory / CONFIG_NAME).is_file():
        named = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
        if named:
            raise CLIError(f"{name} holds named adapters in sub-folders ({', '.join(named)}), none at its top; "
                           f"give one of them: {directory / named[0]}.")
        raise CLIError(f"{name}: no {CONFIG_NAME} in it, so it is not an adapter directory (lp.save_adapter, "
                       f"AdapterCheckpoint and PEFT's save_pretrained write one).")
    return directory


def named_adapter_directories(path: str | Path) -> list[tuple[str | None, Path]]:
    """``[(name, directory)]`` of the adapters a save holds: the one at the top (name None, when
    there is one) and the further named adapters in sub-folders named after them (the layout of
    AdapterCheckpoint and of PEFT's ``save_pretrained`` with several adapters)."""
    directory = Path(path)
    subfolders = sorted(p for p in directory.iterdir() if (p / CONFIG_NAME).is_file()) if directory.is_dir() else []
    if subfolders and not (directory / CONFIG_NAME).is_file():  # PEFT saved only non-default adapters
        return [(p.name, p) for p in subfolders]
    return [(None, adapter_directory(directory))] + [(p.name, p) for p in subfolders]


def inspect_adapters(directory: str | Path, energy: float = 0.9) -> list[AdapterSummary]:
    """:func:`inspect_adapter` for every adapter of a save: the top one, then each named sub-folder."""
    return [inspect_adapter(path, energy, name=name) for name, path in named_adapter_directories(directory)]


def inspect_adapter(directory: str | Path, energy: float = 0.9, name: str | None = None) -> AdapterSummary:
    """Read one adapter directory of any method (ours or HF PEFT's; no base model needed) and
    measure it: tensor counts per kind and per module, and for LoRA the rank spectrum per layer."""
    if not 0 < energy <= 1:
        raise CLIError(f"--energy {energy}: give the share of the spectrum's energy, in (0, 1], e.g. 0.9.")
    directory = adapter_directory(directory)
    config = read_adapter_config(directory)  # one ValueError naming the file and the field if malformed
    raw = json.loads((directory / CONFIG_NAME).read_text())
    tensors = _read_weights(directory, allow_pickle=False)
    if not tensors:
        raise CLIError(f"{directory / WEIGHTS_NAME} holds no tensors: the file was overwritten or the adapter is empty.")
    counts: dict[str, list[int]] = {}
    modules: dict[str, list] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        kind, path = _kind(key.removeprefix(KEY_PREFIX), config)
        size = (tensor.numel(), tensor.numel() * tensor.element_size())
        count = counts.setdefault(kind, [0, 0, 0])
        count[0], count[1], count[2] = count[0] + 1, count[1] + size[0], count[2] + size[1]
        group = modules.setdefault(_module_group(path), [set(), 0, 0, 0])
        group[0].add(path)
        group[1], group[2], group[3] = group[1] + 1, group[2] + size[0], group[3] + size[1]
        if kind in ("lora_A", "lora_B", "magnitude"):
            factors.setdefault(path, {})[kind] = tensor
    foreign = sorted(kind for kind in counts if kind in _METHOD_KINDS and kind not in _OWN_KINDS[config.peft_type])
    if foreign:
        raise CLIError(f"{directory / WEIGHTS_NAME} holds {', '.join(foreign)} tensors, which a "
                       f"{METHODS.get(config.peft_type, config.peft_type)} adapter (peft_type in {CONFIG_NAME}) does "
                       f"not have: the config and the weights belong to different adapters.")
    layers = _spectra(directory, config, factors, energy) if isinstance(config, LoraConfig) else []
    ordered = {kind: tuple(counts[kind]) for kind in KINDS if kind in counts}
    per_module = {group: (len(numbers[0]), *numbers[1:]) for group, numbers in
                  sorted(modules.items(), key=lambda item: _natural(item[0]))}
    return AdapterSummary(directory, raw, ordered, layers, energy, name=name, method=config.peft_type,
                          modules=per_module)


# kinds of tensor that only one method's files hold (each method's own, by peft_type)
_OWN_KINDS = {"LORA": ("lora_A", "lora_B", "magnitude"), "IA3": ("ia3_l",), "BITFIT": ("bitfit_bias",),
              "BOTTLENECK": ("adapter_down", "adapter_up"), "PROMPT_TUNING": (PROMPT_KEY,),
              "PREFIX_TUNING": (PROMPT_KEY,)}
_METHOD_KINDS = {kind for kinds in _OWN_KINDS.values() for kind in kinds}


def _spectra(directory: Path, config: LoraConfig, factors: dict[str, dict[str, torch.Tensor]],
             energy: float) -> list[LayerSpectrum]:
    """The rank spectrum of each LoRA layer, after checking the file against its config: both
    factors present and float, ranks as ``r`` / ``rank_pattern`` say, a DoRA magnitude per layer
    with ``use_dora``, layers among a listed ``target_modules``, a finite update."""
    layers = []
    weights = directory / WEIGHTS_NAME
    named = config.target_modules if isinstance(config.target_modules, list) and not getattr(
        config, "target_parameters", None) else None
    for path in sorted(factors, key=_natural):
        pair = factors[path]
        if "lora_A" not in pair or "lora_B" not in pair:
            raise CLIError(f"{weights}: layer {path} has {', '.join(sorted(pair))} but not both LoRA factors; "
                           f"the file is incomplete.")
        if config.use_dora and "magnitude" not in pair:
            raise CLIError(f"{weights}: layer {path} has no lora_magnitude_vector although {CONFIG_NAME} says "
                           f"use_dora: the config and the weights belong to different adapters.")
        if named is not None and not _matches(named, path):
            raise CLIError(f"{weights}: layer {path} is not among the target_modules of {CONFIG_NAME} "
                           f"({_short(named)}): the config and the weights belong to different adapters.")
        A, B = pair["lora_A"], pair["lora_B"]
        if not (A.is_floating_point() and B.is_floating_point() and A.dim() == B.dim() == 2
                and B.shape[1] == A.shape[0]):
            raise CLIError(f"{directory / WEIGHTS_NAME}: layer {path} has lora_A {A.dtype} {tuple(A.shape)} and "
                           f"lora_B {B.dtype} {tuple(B.shape)}, not float factors [r, in] and [out, r]; the file "
                           f"is corrupt.")
        r = A.shape[0]
        if r != _pattern_value(config.rank_pattern, path, config.r):
            raise CLIError(f"{weights}: layer {path} has rank {r}, {CONFIG_NAME} says "
                           f"{_pattern_value(config.rank_pattern, path, config.r)} (field r / rank_pattern).")
        scaling = lora_scaling(_pattern_value(config.alpha_pattern, path, config.lora_alpha), r, config.use_rslora)
        sigma = factor_singular_values(A, B, scaling)
        if not torch.isfinite(sigma).all():
            raise CLIError(f"{weights}: the update s * B @ A of layer {path} is not finite with s = {scaling:.3g} "
                           f"(field lora_alpha / alpha_pattern of {CONFIG_NAME}).")
        layers.append(LayerSpectrum(path, r, scaling, sigma, effective_rank(sigma, energy)))
    return layers


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, list) and len(value) > 3:
        text = f"{len(value)} entries: {', '.join(map(str, value[:2]))}, ..."
    else:
        text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _method_label(summary: AdapterSummary) -> str:
    label = METHODS.get(summary.method, summary.method)
    return "DoRA" if summary.method == "LORA" and summary.config.get("use_dora") else label


def _adapter_title(summary: AdapterSummary) -> str:
    where = "top level" if summary.name is None else f"adapter {summary.name!r}"
    return f"{where}: {summary.directory} ({_method_label(summary)})"


def print_summaries(summaries: list[AdapterSummary], console: Console | None = None) -> None:
    """One adapter: its tables. Several (named adapters in sub-folders): a list, then each one's tables."""
    console = console or Console()
    if len(summaries) > 1:
        listing = Table(title=f"{len(summaries)} adapters: the top level and named sub-folders")
        for column in ("adapter", "method", "where", "tensors", "parameters"):
            listing.add_column(column, justify="right" if column in ("tensors", "parameters") else "left",
                               overflow="fold")
        for summary in summaries:
            totals = [sum(column) for column in zip(*summary.counts.values())] or [0, 0, 0]
            where = str(summary.directory) if summary.name is None else f"{summary.name}/"
            listing.add_row("(top level)" if summary.name is None else summary.name, _method_label(summary),
                            where, f"{totals[0]:,}", f"{totals[1]:,}")
        console.print(listing)
    for summary in summaries:
        if len(summaries) > 1:
            console.rule(_adapter_title(summary))
        print_summary(summary, console)


def print_summary(summary: AdapterSummary, console: Console | None = None) -> None:
    console = console or Console()
    config = Table(title=f"{summary.directory / CONFIG_NAME}", show_header=False)
    config.add_column("field")
    config.add_column("value", overflow="fold")
    config.add_row("method", _method_label(summary))
    config.add_section()
    for key in sorted(summary.config):
        if summary.config[key] not in (None, {}, [], ""):
            config.add_row(key, _short(summary.config[key]))
    console.print(config)

    counts = Table(title=f"tensors in {WEIGHTS_NAME}")
    for column in ("kind", "tensors", "parameters", "bytes"):
        counts.add_column(column, justify="left" if column == "kind" else "right")
    for kind, numbers in summary.counts.items():
        counts.add_row(kind, *(f"{n:,}" for n in numbers))
    counts.add_section()
    counts.add_row("total", *(f"{sum(column):,}" for column in zip(*summary.counts.values())))
    console.print(counts)

    modules = Table(title="the same, per module (layer numbers as *)")
    rows = {group: [f"{n:,}" for n in numbers] for group, numbers in summary.modules.items()}
    widths = [max([len(column)] + [len(row[i]) for row in rows.values()]) for i, column in
              enumerate(("modules", "tensors", "parameters", "bytes"))]
    shown = shorten_names(rows, name_width(rows, console.width, widths))
    modules.add_column("module", no_wrap=True)
    for column, least in zip(("modules", "tensors", "parameters", "bytes"), widths):
        modules.add_column(column, justify="right", no_wrap=True, min_width=least)  # numbers are never cut
    for group, numbers in rows.items():
        modules.add_row(shown[group], *numbers)
    console.print(modules)

    if summary.method != "LORA":
        return  # the rank spectrum is LoRA's: the other methods have no low-rank factors
    if not summary.layers:
        console.print("no LoRA layers in this adapter")
        return
    ranks = [layer.effective_rank for layer in summary.layers]
    spectra = Table(title=f"rank spectrum of s·B·A per layer (effective rank at {summary.energy:.0%} energy)",
                    caption=_spectrum_caption(summary, ranks))
    values = {layer.path: ", ".join(f"{v:.3g}" for v in layer.singular_values[:TOP_VALUES_SHOWN].tolist())
              for layer in summary.layers}
    # names lose their middle if the terminal is narrow (the end tells q/k/v apart); numbers wrap, never cut
    shown = shorten_names(values, name_width(values, console.width, [3, 5, 8, 9, 16]))
    spectra.add_column("layer", no_wrap=True)
    for column in ("r", "s", "‖s·B·A‖", "eff. rank"):
        spectra.add_column(column, justify="right", no_wrap=True)
    spectra.add_column(f"top {TOP_VALUES_SHOWN} singular values", justify="right", overflow="fold")
    for layer in summary.layers:
        sigma = layer.singular_values
        spectra.add_row(shown[layer.path], str(layer.r), f"{layer.scaling:.3g}",
                        f"{sigma.norm().item():.3g}", str(layer.effective_rank), values[layer.path])
    console.print(spectra)


def _spectrum_caption(summary: AdapterSummary, ranks: list[int]) -> str:
    if not any(ranks):
        return "every update is zero (B = 0): the adapter is untrained."
    r = max(layer.r for layer in summary.layers)
    text = (f"{len(ranks)} layers, effective rank median {statistics.median(ranks):g}, max {max(ranks)} of r={r}; "
            f"the smallest k whose top-k sigma^2 hold {summary.energy:.0%} of the sum")
    if summary.config.get("use_dora"):
        text += "; DoRA: the spectrum of the directional update, before the magnitude"
    return text + "."


def command_inspect(args: argparse.Namespace) -> None:
    print_summaries(inspect_adapters(args.directory, energy=args.energy))


# --------------------------------------------------------------------------------------- merge
_IMPORT_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?")


def load_base(spec: str) -> nn.Module:
    """The base model named by ``--base``: a local transformers model directory (``config.json`` +
    weights; loaded offline with ``AutoModelForCausalLM``, else ``AutoModel``), or an import spec
    ``package.module:attr`` / ``package.module.attr`` naming a module, or a class or function
    that builds one with no arguments. A LightningModule gives the model it trains (the child the
    lightning-peft strategies inject into, whose paths the adapter files use)."""
    path = Path(spec)
    if path.is_dir():
        return _load_pretrained(path)
    if path.exists():
        raise CLIError(f"--base {spec} is a file; give a model directory (save_pretrained writes one) or an "
                       f"import spec such as my_package.models:build_model.")
    if not _IMPORT_SPEC.fullmatch(spec) or ("." not in spec and ":" not in spec):
        raise CLIError(f"--base {spec}: no such directory (nor an import spec such as my_package.models:build_model).")
    built = _import_object(spec)
    if not isinstance(built, nn.Module) and callable(built):
        built = built()
    if not isinstance(built, nn.Module):
        raise CLIError(f"--base {spec} gave a {type(built).__name__}, not a torch.nn.Module.")
    from lightning.pytorch import LightningModule  # a module built by the spec: Lightning is loaded then

    if isinstance(built, LightningModule):
        built.configure_model()  # Lightning builds large models there, before the strategy's setup
        from .strategy import peft_target

        built = peft_target(built)
    return built.eval()


def _load_pretrained(path: Path) -> nn.Module:
    if not (path / "config.json").is_file():
        raise CLIError(f"--base {path}: no config.json in it, so it is not a transformers model directory "
                       f"(save_pretrained writes one).")
    try:
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError:
        raise CLIError(f"--base {path} is a transformers model directory: pip install transformers") from None
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    except ValueError as err:  # not a causal LM architecture (an encoder, a classifier backbone, ...)
        if "Unrecognized configuration class" not in str(err):
            raise
        return AutoModel.from_pretrained(path, local_files_only=True).eval()


def _import_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not attr:
        module_name, _, attr = spec.rpartition(".")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise CLIError(f"--base {spec}: no such directory, and no module {err.name!r} to import.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--base {spec}: {module_name} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


# peft_type -> why no merged weights exist (prompt / prefix tuning add virtual tokens, ...)
UNMERGEABLE = {peft_type: cls.unmergeable_reason for peft_type, cls in CONFIG_TYPES.items() if not cls.mergeable}


def _refuse_unmergeable(adapter: Path) -> None:
    """Refuse a malformed config, or a method that cannot be merged, before the (possibly large)
    base is loaded."""
    peft_type = read_adapter_config(adapter).peft_type
    if peft_type in UNMERGEABLE:
        raise CLIError(f"--adapter {adapter} is a {METHODS[peft_type]} adapter, which {UNMERGEABLE[peft_type]}: it "
                       f"cannot be folded into the base weights. Serve it as an adapter instead "
                       f"(lightning_peft.load_adapter(base, '{adapter}')).")


def command_merge(args: argparse.Namespace) -> None:
    from .export import parse_size

    try:
        parse_size(args.max_shard_size)  # before the (possibly large) base is loaded
    except ValueError as err:
        raise CLIError(f"--max-shard-size {args.max_shard_size}: {str(err).split(': ', 1)[-1]}") from None
    adapter = adapter_directory(args.adapter, "--adapter")
    _refuse_unmergeable(adapter)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a directory for model.safetensors.")
    model = load_base(args.base)
    if args.quantize:  # the function a QLoRA adapter was trained against: dequantized NF4 + s B A
        quantize_base(model, QuantConfig(quant_type=args.quantize))
    load_adapter(model, adapter)
    base = Path(args.base) if Path(args.base).is_dir() else None  # config, tokenizer files
    weights = export_merged(model, out, dtype=DTYPES[args.dtype], base=base, max_shard_size=args.max_shard_size)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    table = Table(title="merged model", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for what, value in (("base", args.base), ("adapter", str(adapter)),
                        ("base quantized first", args.quantize or "no (float base)"), ("written", str(weights)),
                        ("dtype", manifest["dtype"]), ("tensors", f"{manifest['tensors']:,}"),
                        ("bytes", f"{manifest['bytes']:,}")):
        table.add_row(what, value)
    Console().print(table)


# ---------------------------------------------------------------------------------------- demo
def command_demo(args: argparse.Namespace) -> None:
    try:  # lazily: the CLI works without it, and the demo pulls in more than the other commands
        from .demo import run_demo
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.demo":
            raise
        raise CLIError("this install has no lightning_peft.demo module; update lightning-peft.") from None
    run_demo(out_dir=args.out, fast=args.fast, seed=args.seed)  # prints its own summary table


# ---------------------------------------------------------------------------------------- main
COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "inspect": command_inspect, "merge": command_merge, "demo": command_demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-peft", description="Parameter-efficient fine-tuning with "
                                     "PyTorch Lightning: train, inspect adapters, export merged models.")
    parser.add_argument("--version", action="version", version=f"lightning-peft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:  # dispatched to LightningCLI before this parser runs
        commands.add_parser(name, add_help=False, help=f"LightningCLI {name} (--config cfg.yaml, --model.*, "
                                                       f"--trainer.*); see lightning-peft {name} --help")

    inspect = commands.add_parser("inspect", help="config, tensor counts (LoRA: rank spectra) of an adapter directory",
                                  description="Read an adapter directory (adapter_config.json + "
                                              "adapter_model.safetensors) without the base model.")
    inspect.add_argument("directory", help="the adapter directory")
    inspect.add_argument("--energy", type=float, default=0.9,
                         help="share of sum(sigma^2) the effective rank holds (default 0.9)")

    merge = commands.add_parser("merge", help="merge an adapter into its base and write model.safetensors",
                                description="Load the base, load the adapter, write the merged model "
                                            "(keys of the plain architecture) with lightning_peft.export_merged.")
    merge.add_argument("--base", required=True,
                       help="a transformers model directory, or an import spec (pkg.module:build_model) of a "
                            "module, class or function that builds the base")
    merge.add_argument("--adapter", required=True, help="the adapter directory")
    merge.add_argument("--out", required=True, help="output directory")
    merge.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="dtype of the written tensors")
    merge.add_argument("--quantize", choices=list(QUANT_TYPES), default=None,
                       help="quantize the base as in training first (a QLoRA adapter: nf4), so that the export "
                            "is the function that was trained; default: merge into the float base")
    merge.add_argument("--max-shard-size", default="5GB",
                       help="split the weights into shards with an index above this size (default 5GB)")

    demo = commands.add_parser("demo", help="the quick demo: fine-tune a tiny model and report")
    demo.add_argument("--fast", action="store_true", help="fewer steps")
    demo.add_argument("--out", type=Path, default=None, help="where to write the demo's files")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lightning-peft: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-peft`` console script; returns the exit status."""
    from_sys_argv = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return run_lightning(argv, from_sys_argv)
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            COMMANDS[args.command](args)
    except USER_ERRORS as err:
        print(f"lightning-peft {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
