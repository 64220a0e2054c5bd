"""``adapter_report``: what trains, how much of the model that is, and what it costs in bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from torch import nn

from .checkpoint import adapter_tensors
from .inject import adapter_configs, adapter_modules
from .quantize import logical_numel


@dataclass
class AdapterReport:
    """Parameter counts of a model with adapters.

    ``total_params`` counts every parameter once (adapters included; a packed 4-bit weight as the
    ``out * in`` weights it stands for); ``per_adapter`` maps each
    adapter name to its parameter count and ``per_method`` splits the counts by method
    (``"lora"``, ``"dora_magnitude"``, ``"ia3"``, ``"bitfit"``, ``"bottleneck"``, ``"prompt"``,
    ``"prefix"``, ``"modules_to_save"``, ``"bias"``) over all adapters.
    """

    total_params: int
    trainable_params: int
    trainable_bytes: int
    adapter_bytes: int
    per_adapter: dict[str, int] = field(default_factory=dict)
    per_method: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def table(self) -> Table:
        table = Table(title="lightning-peft adapters")
        table.add_column("what")
        table.add_column("params", justify="right")
        table.add_row("total", f"{self.total_params:,}")
        table.add_row("trainable", f"{self.trainable_params:,} ({100 * self.trainable_fraction:.3f} %)")
        for name, count in self.per_adapter.items():
            table.add_row(f"adapter {name!r}", f"{count:,}")
        for method, count in self.per_method.items():
            table.add_row(f"  method {method}", f"{count:,}")
        table.add_row("trainable bytes", f"{self.trainable_bytes:,}")
        table.add_row("adapter bytes (all adapters)", f"{self.adapter_bytes:,}")
        return table


def adapter_report(model: nn.Module, show: bool = True, console: Console | None = None) -> AdapterReport:
    """Count parameters of ``model`` and its adapters; print a rich table unless ``show=False``."""
    params = list(model.parameters())
    per_adapter: dict[str, int] = {}
    per_method: dict[str, int] = {}
    adapter_bytes = 0
    for name in adapter_configs(model):
        tensors = adapter_tensors(model, name)
        per_adapter[name] = sum(t.numel() for t in tensors.values())
        adapter_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        in_modules = 0
        for _, module in adapter_modules(model):
            if name in module.adapter_names():
                for key, tensor in module.adapter_state(name).items():
                    method = "dora_magnitude" if key == "lora_magnitude_vector" else module.method_name(name)
                    per_method[method] = per_method.get(method, 0) + tensor.numel()
                    in_modules += tensor.numel()
        if per_adapter[name] > in_modules:  # the rest: biases freed by the config's ``bias``
            per_method["bias"] = per_method.get("bias", 0) + per_adapter[name] - in_modules
    trainable = [p for p in params if p.requires_grad]
    report = AdapterReport(total_params=sum(logical_numel(p) for p in params),  # 4-bit: weights, not bytes
                           trainable_params=sum(p.numel() for p in trainable),
                           trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
                           adapter_bytes=adapter_bytes, per_adapter=per_adapter, per_method=per_method)
    if show:
        (console or Console()).print(report.table())
    return report
