"""``MergeAdapters``: after fit, export the merged model and check that it computes what the
adapted model does.

On global rank 0, at the end of ``fit``: :func:`lightning_peft.export_merged` writes a
``from_pretrained`` directory: ``model.safetensors`` (4-bit weights dequantized, adapters merged in
fp32, then cast to ``dtype``; sharded with an index above ``max_shard_size``) with the keys of the
adapted model (the transformers model inside the LightningModule), its ``config.json``,
``generation_config.json`` and tokenizer files, and a model card with the fit's metrics. With
``verify``, the export is loaded into a plain copy of that architecture (lightning-peft layers
replaced by ``nn.Linear``/the original modules, every tensor from the file, strict keys), run in
fp32 on a probe batch, and compared with the adapted model's output (its 4-bit layers computing
in fp32 for the occasion, so that bf16 matmul rounding is not taken for an export error). A rich table shows the
errors; beyond the tolerance the callback raises.

Not every method can be merged: prompt and prefix tuning add virtual tokens and bottleneck adapters
are nonlinear, so ``export_merged`` refuses them. The callback checks at fit start (after the
strategy injected the adapters, before the first step), so that a run is not spent on an export
that cannot happen; (IA)^3 and BitFit merge like LoRA. BitFit gives layers without a bias (Llama's
projections) a merged bias, and the plain copy used for verification gets those biases too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table
from torch import nn

from ..config import CONFIG_TYPES
from ..export import DEFAULT_MAX_SHARD_SIZE, parse_size, read_weights
from ..inject import adapter_configs, adapter_modules, adapter_owner
from ..merge import _refuse_unmergeable, _resolve, export_merged
from ..methods import AdapterModule
from ..quantize import is_quantized

DEFAULT_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _plain_module(module: nn.Module) -> nn.Module:
    if isinstance(module, AdapterModule):
        module = getattr(module, module.wrapped_attr)
    if is_quantized(module):
        module = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    return module


def _unwrap_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, AdapterModule) and child.wrapped_attr is None:  # prompt / prefix: wraps nothing
            child.disabled = True  # its forward pre-hook, copied onto the parent too, becomes a no-op
            delattr(module, name)
            continue
        plain = _plain_module(child)
        if plain is not child:
            setattr(module, name, plain)
        _unwrap_children(plain)


def _add_merged_biases(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """A merged BitFit export holds ``<layer>.bias`` for layers built without a bias (Llama's
    projections): give those layers of the plain copy a (meta) bias to load it into."""
    modules = dict(model.named_modules())
    for key, tensor in weights.items():
        path, _, leaf = key.rpartition(".")
        module = modules.get(path)
        if leaf == "bias" and module is not None and "bias" in module._parameters and module.bias is None:
            module.bias = nn.Parameter(torch.empty(tensor.shape, device="meta"), requires_grad=False)


def plain_copy(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The architecture of ``model`` without lightning-peft: adapter modules give way to the
    module they wrap (a model-level prompt / prefix module, which wraps nothing, is dropped),
    4-bit/8-bit layers to ``nn.Linear`` (with a bias where ``weights`` has one: merged BitFit), and
    every tensor comes from ``weights`` (strict: a missing or extra key raises). fp32, on the CPU."""
    # copy the structure, not the data: every tensor becomes an empty meta tensor in the copy
    # (non-persistent buffers, such as rotary frequencies, are not in the file: those are copied)
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False)
                            for p in model.parameters()}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                memo[id(buffer)] = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")
    skeleton = copy.deepcopy(model, memo)
    _unwrap_children(skeleton)
    _add_merged_biases(skeleton, weights)
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton.eval()


def model_output(model: nn.Module, batch: Any) -> torch.Tensor:
    """Call ``model`` on a batch (tensor: positional; dict: keywords; tuple/list: its first item as
    ``input_ids``-like input) and return its logits/tensor output as fp32."""
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(batch[0])
    else:
        out = model(batch)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float()


class MergeAdapters(Callback):
    """Export the merged model at the end of ``fit`` and verify it.

    Args:
        output_dir: where ``model.safetensors`` and ``lightning_peft_export.json`` go.
        dtype: dtype of the exported float tensors.
        verify: reload the export into the plain architecture and compare outputs.
        probe_batch: the batch to compare on (default: the first validation batch, else the first
            training batch); called as ``model(batch)`` or ``model(**batch)`` for a dict.
        tolerance: largest accepted ``||export - adapted|| / ||adapted||`` (default 1e-5 for fp32
            exports, 1e-2 for bf16/fp16).
        adapter_name: which adapter to merge (default: the active one).
        base / tokenizer / max_shard_size: as :func:`lightning_peft.export_merged` (the base's
            local directory for config and tokenizer files, a tokenizer to save, the shard size).

    The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` when the model
    is a transformers model (or ``base`` has a ``config.json``); its ``README.md`` records the
    fit's data counts and final metrics.
    """

    def __init__(self, output_dir, dtype: torch.dtype = torch.bfloat16, verify: bool = True,
                 probe_batch: Any = None, tolerance: float | None = None, adapter_name: str | None = None,
                 base=None, tokenizer: Any = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
        if dtype not in DEFAULT_TOLERANCE:
            raise ValueError(f"dtype={dtype}: export as one of {list(DEFAULT_TOLERANCE)}.")
        self.output_dir = Path(output_dir)
        self.dtype = dtype
        self.verify = verify
        self.probe_batch = probe_batch
        self.tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
        self.adapter_name = adapter_name
        self.base = base
        self.tokenizer = tokenizer
        self.max_shard_size = max_shard_size
        parse_size(max_shard_size)  # a bad size fails now, not after the fit
        self.export_path: Path | None = None
        self.errors: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self._check_mergeable(pl_module)  # the strategy injected the adapters in its setup, before this

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._export_and_verify(trainer, pl_module)
        trainer.strategy.barrier("MergeAdapters.on_fit_end")

    def _check_mergeable(self, pl_module) -> None:
        """Raise now, before training, if the adapter to export is missing or cannot be merged."""
        if not adapter_configs(pl_module):
            raise RuntimeError("MergeAdapters found no adapters to merge; use a lightning-peft strategy or "
                               "lightning_peft.inject_adapters on the LightningModule's model.")
        model = adapter_owner(pl_module)
        name = _resolve(model, self.adapter_name)
        try:
            _refuse_unmergeable(model, name)
        except ValueError:
            methods = sorted({m.method_name(name) for _, m in adapter_modules(model) if name in m.adapter_names()})
            reason = adapter_configs(model)[name].unmergeable_reason
            mergeable = ", ".join(cls.display_name for cls in CONFIG_TYPES.values() if cls.mergeable)
            raise RuntimeError(
                f"MergeAdapters cannot export adapter {name!r}: it is a {' + '.join(methods)} adapter, which cannot be "
                f"folded into the base weights (it {reason}); only {mergeable} merge. Checked at fit start, so no training is "
                f"spent on it. Remove MergeAdapters and keep the adapter: AdapterCheckpoint(dirpath=...) saves it "
                f"during training, lightning_peft.save_adapter(model, directory) after the fit, and "
                f"lightning_peft.load_adapter(base_model, directory) serves it.") from None

    def _export_and_verify(self, trainer, pl_module) -> None:
        self._check_mergeable(pl_module)  # again: adapters may have changed during the fit
        model = adapter_owner(pl_module)
        self.export_path = export_merged(model, self.output_dir, dtype=self.dtype, adapter_name=self.adapter_name,
                                         base=self.base, tokenizer=self.tokenizer,
                                         max_shard_size=self.max_shard_size, trainer=trainer)
        if self.verify:
            self.errors = self._compare(trainer, model)
        self._report()
        if self.verify and not self.errors["rel"] <= self.tolerance:
            raise RuntimeError(f"the merged export {self.export_path} does not reproduce the adapted model: relative "
                               f"error {self.errors['rel']:.3e} > tolerance {self.tolerance:.0e} (max abs "
                               f"{self.errors['max']:.3e}). The file is corrupt or was changed after writing; do not "
                               f"ship it. Re-run the export (lightning_peft.export_merged) and check disk space.")

    def _probe(self, trainer) -> Any:
        if self.probe_batch is not None:
            return self.probe_batch
        for loaders in (trainer.val_dataloaders, trainer.train_dataloader):
            loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
            if loader is not None:
                return next(iter(loader))
        raise RuntimeError("MergeAdapters needs a probe batch to verify the export: pass probe_batch=..., or "
                           "give the Trainer a validation or training dataloader (or verify=False).")

    def _compare(self, trainer, model: nn.Module) -> dict[str, float]:
        batch = self._probe(trainer)
        was_training = model.training
        model.eval()
        # The reference is the adapted model computed in fp32 (4-bit weights dequantized to fp32, as
        # the export does), so the comparison measures the export, not bf16 matmul rounding.
        four_bit = [m for m in model.modules() if is_quantized(m) and hasattr(m, "compute_dtype")]
        compute_dtypes = [m.compute_dtype for m in four_bit]
        for m in four_bit:
            m.compute_dtype = torch.float32
        try:
            with torch.no_grad():
                device = next(model.parameters()).device
                adapted = model_output(model, move_data_to_device(batch, device)).cpu()
                plain = plain_copy(model, read_weights(self.output_dir))
                exported = model_output(plain, move_data_to_device(batch, "cpu"))
        finally:
            model.train(was_training)
            for m, dtype in zip(four_bit, compute_dtypes):
                m.compute_dtype = dtype
        diff = (exported - adapted).abs()
        return {"max": diff.max().item(), "mean": diff.mean().item(),
                "rel": ((exported - adapted).norm() / adapted.norm().clamp_min(1e-30)).item()}

    def _report(self) -> None:
        table = Table(title="lightning-peft merged export")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("path", str(self.export_path))
        size = sum(p.stat().st_size for p in self.output_dir.iterdir() if p.name.endswith(".safetensors"))
        table.add_row("size", f"{size:,} bytes of weights")
        table.add_row("dtype", str(self.dtype).removeprefix("torch."))
        if self.errors:
            table.add_row("max |export - adapted|", f"{self.errors['max']:.3e}")
            table.add_row("mean |export - adapted|", f"{self.errors['mean']:.3e}")
            ok = self.errors["rel"] <= self.tolerance
            table.add_row("relative error", f"{self.errors['rel']:.3e} ({'ok' if ok else 'FAILED'}, "
                                            f"tolerance {self.tolerance:.0e})")
        Console().print(table)
