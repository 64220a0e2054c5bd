"""Model cards (``README.md``) for adapter directories and merged exports.

A card says what the directory holds and how to load it: the base model, the method and its
config, the trainable parameters, and, when a Trainer is known (the callbacks pass theirs), the
data counts, steps and final logged metrics. The YAML header follows the Hugging Face Hub's card
metadata (``base_model``, ``library_name``, ``tags``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from .config import CONFIG_TYPES

CARD_NAME = "README.md"
# peft_type -> the method's display name (each config class's display_name)
METHOD_NAMES = {peft_type: cls.display_name for peft_type, cls in CONFIG_TYPES.items()}


def method_name(config: dict[str, Any]) -> str:
    """The display name of an adapter config dict (``adapter_config.json`` content)."""
    peft_type = config.get("peft_type", "")
    if peft_type == "LORA" and config.get("use_dora"):
        return "DoRA"
    if peft_type == "LORA" and config.get("use_rslora"):
        return "LoRA (rsLoRA scaling)"
    return METHOD_NAMES.get(peft_type, peft_type or "unknown")


def _sized(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _loader_counts(loaders: Any) -> tuple[int | None, int | None]:
    """``(examples, batches)`` over one DataLoader or a list of them (None where unsized)."""
    if loaders is None:
        return None, None
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    examples = [_sized(getattr(dl, "dataset", None)) for dl in loaders]
    batches = [_sized(dl) for dl in loaders]
    return (None if None in examples or not examples else sum(examples),
            None if None in batches or not batches else sum(batches))


def training_facts(trainer: Any) -> dict[str, Any]:
    """What a finished (or running) fit tells a card: data counts, steps, epochs, final metrics."""
    if trainer is None:
        return {}
    facts: dict[str, Any] = {}
    train, _ = _loader_counts(getattr(trainer, "train_dataloader", None))
    val, _ = _loader_counts(getattr(trainer, "val_dataloaders", None))
    if train is not None:
        facts["training examples"] = train
    if val is not None:
        facts["validation examples"] = val
    facts["optimizer steps"] = trainer.global_step
    facts["epoch when written (0-based)"] = trainer.current_epoch
    metrics = {}
    for key, value in sorted(getattr(trainer, "callback_metrics", {}).items()):
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):  # a non-scalar tensor
            continue
        if math.isfinite(number):
            metrics[key] = number
    if metrics:
        facts["final metrics"] = metrics
    return facts


def _base_name(model: nn.Module | None, config: dict[str, Any] | None) -> str | None:
    name = (config or {}).get("base_model_name_or_path") or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _params_line(model: nn.Module | None) -> str | None:
    if model is None:
        return None
    from .report import adapter_report

    report = adapter_report(model, show=False)
    return (f"{report.trainable_params:,} trainable of {report.total_params:,} parameters "
            f"({100 * report.trainable_fraction:.3f} %; a 4-bit weight counted as the weights it stands for)")


def _header(base: str | None, tags: list[str], library: str) -> list[str]:
    lines = ["---"]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    lines.append(f"library_name: {library}")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in tags]
    lines.append("---")
    return lines


def _facts_section(facts: dict[str, Any]) -> list[str]:
    if not facts:
        return ["## Training", "", "Not recorded (written outside a Trainer's callbacks).", ""]
    lines = ["## Training", ""]
    for key, value in facts.items():
        if key == "final metrics":
            continue
        lines.append(f"- {key}: {value:,}" if isinstance(value, int) else f"- {key}: {value}")
    metrics = facts.get("final metrics")
    if metrics:
        lines += ["", "Final logged metrics:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.6g} |" for key, value in metrics.items()]
    return lines + [""]


def adapter_card(config: dict[str, Any], model: nn.Module | None = None, trainer: Any = None,
                 adapter_name: str = "default") -> str:
    """The README.md of an adapter directory."""
    base = _base_name(model, config)
    method = method_name(config)
    lines = _header(base, ["lightning-peft", method, "peft"], "peft")
    lines += [f"# {method} adapter" + (f" for {base}" if base else ""), "",
              f"Adapter `{adapter_name}` in the HF PEFT format (`adapter_config.json`, "
              f"`adapter_model.safetensors`), written by lightning-peft.", ""]
    params = _params_line(model)
    lines += ["## Adapter", "", f"- method: {method}", f"- base model: {base or 'not recorded'}"]
    if params:
        lines.append(f"- parameters: {params}")
    lines += ["", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]
    lines += _facts_section(training_facts(trainer))
    base_arg = json.dumps(base) if base else '"<base model>"'
    lines += ["## How to load", "", "With lightning-peft (any base module, no PEFT needed):", "", "```python",
              "import lightning_peft as lp", "from transformers import AutoModelForCausalLM",
              f"model = AutoModelForCausalLM.from_pretrained({base_arg})",
              "lp.load_adapter(model, \"path/to/this/directory\")", "```", ""]
    if config.get("peft_type") in ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING"):
        lines += ["With HF PEFT:", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained({base_arg})",
                  "model = PeftModel.from_pretrained(base, \"path/to/this/directory\")", "```", ""]
    if config.get("peft_type") == "LORA" and not config.get("use_dora"):
        lines += ["Served with vLLM's multi-LoRA (one base, many adapters per batch):", "", "```bash",
                  f"vllm serve {base or '<base model>'} --enable-lora --max-lora-rank {config.get('r', 16)} "
                  f"--lora-modules {adapter_name}=path/to/this/directory", "```", ""]
    return "\n".join(lines)


def merged_card(manifest: dict[str, Any], model: nn.Module | None = None, trainer: Any = None,
                files: list[str] | None = None) -> str:
    """The README.md of a merged export (``manifest``: what ``lightning_peft_export.json`` holds)."""
    config = manifest.get("adapter_config") or {}
    base = _base_name(model, config)
    method = method_name(config) if config else "no adapter"
    lines = _header(base, ["lightning-peft", method, "merged"], "transformers")
    lines += [f"# {base or 'model'} with a {method} adapter merged in", "",
              f"The base model with adapter `{manifest.get('adapter')}` folded into its weights (adapters merged in "
              f"fp32, 4-bit weights dequantized first, then every float tensor cast to {manifest.get('dtype')}). "
              f"It needs neither PEFT nor lightning-peft to run.", ""]
    lines += ["## Contents", "", f"- tensors: {manifest.get('tensors'):,}, {manifest.get('bytes'):,} bytes",
              f"- dtype: {manifest.get('dtype')}",
              f"- base quantized during training: {'yes, ' + json.dumps(manifest['quantized_base']) if manifest.get('quantized_base') else 'no'}"]
    if files:
        lines.append(f"- files: {', '.join(sorted(files))}")
    params = _params_line(model)
    if params:
        lines.append(f"- adapter before merging: {params}")
    if config:
        lines += ["", "Adapter config:", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```"]
    lines += [""]
    lines += _facts_section(training_facts(trainer))
    lines += ["## How to load", ""]
    if files and "config.json" in files:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/directory\")"]
        if any(name.startswith("tokenizer") for name in files):
            lines.append("tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/directory\")")
        lines += ["```", "", "Served as is: `vllm serve path/to/this/directory` (or TGI with `--model-id`).", ""]
    else:
        lines += ["No `config.json` (the model is not a transformers model, and no base directory was given): "
                  "load the state dict into the plain architecture:", "", "```python",
                  "from safetensors.torch import load_file",
                  "model.load_state_dict(load_file(\"path/to/this/directory/model.safetensors\"))", "```", ""]
    return "\n".join(lines)


def write_card(directory: Path, text: str) -> None:
    (Path(directory) / CARD_NAME).write_text(text)
