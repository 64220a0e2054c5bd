r"""``RankMonitor``: how much of its rank does each LoRA adapter use?

For the active adapter of each LoRA layer, with ``A: [r, in]``, ``B: [out, r]`` and scaling ``s``,
the update ``delta W = s B A`` has at most ``r`` non-zero singular values. They come from two thin
QR factorizations instead of an SVD of the full ``[out, in]`` matrix:

    B = Q_B R_B,   A^T = Q_A R_A    =>    s B A = Q_B (s R_B R_A^T) Q_A^T
    sigma(delta W) = sigma(s R_B R_A^T)       (an r x r SVD; Q_B, Q_A have orthonormal columns)

The *effective rank* at energy ``e`` is the smallest ``k`` with
``sum_{i<=k} sigma_i^2 >= e * sum_i sigma_i^2`` (0 for an update that is still zero). When most
layers use a small part of ``r``, a smaller rank would train the same update with fewer
parameters (and less room to forget). For DoRA adapters the spectrum is that of ``s B A``, the
directional update before the magnitude rescale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from rich.table import Table

from ..inject import adapter_configs, adapter_modules
from ..methods import LoraLayer
from ..tables import name_width, shorten_names
from ..spectrum import (TOP_VALUES_SHOWN, delta_singular_values, effective_rank,  # noqa: F401 (re-exported)
                        factor_singular_values)


class RankMonitor(Callback):
    """Track the singular-value spectrum and effective rank of every LoRA update while training.

    Args:
        every_n_steps: measure after every ``every_n_steps`` optimizer steps (and once at fit end).
        energy: the share of ``sum sigma^2`` the effective rank must hold, in (0, 1].
        plot_path: where to write a PNG (matplotlib, the ``plots`` extra) at fit end: for every
            layer the relative error of the best rank-``k`` fit of its update against ``k`` (the
            chapter's figure, :func:`lightning_peft.plots.rank_error_figure`), and the effective
            ranks over training. Default: ``<trainer.default_root_dir>/rank_spectra.png`` when
            matplotlib is installed (else one warning says how to get it); a path given here
            without matplotlib is an ``ImportError`` at construction. ``plot=False``: no figure.

    Each measurement is logged as ``effective_rank/<layer path>``. History, kept in the
    checkpoint: ``steps`` (global steps measured), ``effective_ranks[path]`` and
    ``spectra[path]`` (singular values, descending) aligned with ``steps``, ``ranks[path]`` (the
    configured ``r``). At fit end global rank 0 prints a table and, when most layers use at most a
    quarter of their rank, a suggestion (also in ``suggestion``).
    """

    def __init__(self, every_n_steps: int = 50, energy: float = 0.9, plot_path: str | Path | None = None,
                 plot: bool = True) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"RankMonitor(every_n_steps={every_n_steps!r}): give a number of optimizer steps >= 1.")
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise ValueError(f"RankMonitor(energy={energy!r}): give the share of the spectrum's energy (sum of "
                             f"squared singular values) the effective rank must hold, in (0, 1], e.g. 0.9.")
        self.every_n_steps = every_n_steps
        self.energy = float(energy)
        self.plot_path = None if plot_path is None else Path(plot_path)
        self.plot = bool(plot)
        if self.plot and self.plot_path is not None:
            from ..plots import require_matplotlib

            require_matplotlib(f"RankMonitor(plot_path={str(plot_path)!r})")
        self.steps: list[int] = []
        self.effective_ranks: dict[str, list[int]] = {}
        self.spectra: dict[str, list[list[float]]] = {}
        self.ranks: dict[str, int] = {}
        self.suggestion: str | None = None
        self.plot_file: Path | None = None

    # ------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lora_layers(pl_module)  # refuse a model without LoRA now, not at the first measurement

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._due(trainer.global_step):
            self._measure(pl_module, trainer.global_step, log=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "effective_ranks": self.effective_ranks, "spectra": self.spectra,
                "ranks": self.ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict["steps"])
        self.effective_ranks = {k: list(v) for k, v in state_dict["effective_ranks"].items()}
        self.spectra = {k: list(v) for k, v in state_dict["spectra"].items()}
        self.ranks = dict(state_dict["ranks"])

    # ----------------------------------------------------------------------------------- worker
    def _due(self, step: int) -> bool:
        # several batches share a step under gradient accumulation; step 0 is the untrained B = 0
        return step > 0 and step % self.every_n_steps == 0 and self.steps[-1:] != [step]

    def _lora_layers(self, pl_module: pl.LightningModule) -> list[tuple[str, LoraLayer]]:
        layers = [(path, m) for path, m in adapter_modules(pl_module)
                  if isinstance(m, LoraLayer) and m.active_adapter in m.scaling]
        if layers:
            return layers
        configs = adapter_configs(pl_module)
        active = {m.active_adapter for _, m in adapter_modules(pl_module) if m.active_adapter in m.adapter_names()}
        if configs and active:
            other = ", ".join(f"{name!r} is {configs[name].display_name}" for name in sorted(active))
            raise RuntimeError(f"RankMonitor measures the rank of LoRA updates (s B A), but the active adapter {other}, "
                               f"which has no low-rank factors: remove RankMonitor from the callbacks for this run, or "
                               f"train a LoraConfig adapter.")
        raise RuntimeError("RankMonitor found no LoRA layers with an active adapter in the LightningModule; use "
                           "a lightning-peft strategy (e.g. strategy='lora') or lightning_peft.inject_adapters.")

    def _measure(self, pl_module: pl.LightningModule, step: int, log: bool) -> None:
        layers = self._lora_layers(pl_module)
        self.steps.append(step)
        for path, layer in layers:
            sigma = delta_singular_values(layer, layer.active_adapter)
            self.ranks[path] = layer._factors(layer.active_adapter)[0].shape[0]
            self.spectra.setdefault(path, []).append(sigma.tolist())
            self.effective_ranks.setdefault(path, []).append(effective_rank(sigma, self.energy))
        if log:
            pl_module.log_dict({f"effective_rank/{path}": float(self.effective_ranks[path][-1]) for path, _ in layers},
                               on_step=True, on_epoch=False)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps[-1:] != [trainer.global_step]:
            self._measure(pl_module, trainer.global_step, log=False)  # the final adapter
        self.suggestion = self._suggest()
        if trainer.is_global_zero:
            self._print_table()
            if self.plot:
                self._plot(self.plot_path or Path(trainer.default_root_dir) / "rank_spectra.png")

    def _suggest(self) -> str | None:
        latest = {path: ranks[-1] for path, ranks in self.effective_ranks.items()}
        low = [path for path, k in latest.items() if k <= self.ranks[path] / 4]
        used = max(latest[path] for path in low) if low else 0
        if 2 * len(low) <= len(latest) or used == 0:  # not most layers, or nothing trained yet
            return None
        r = max(self.ranks.values())
        suggested = 1 << (2 * used - 1).bit_length()  # a power of two >= twice the largest rank used
        text = (f"effective rank <= r/4 in {len(low)} of {len(latest)} LoRA layers (at most {used} at "
                f"{self.energy:.0%} energy, r={r}): r={suggested} would likely do, with "
                f"{r // suggested}x fewer adapter parameters and less room to forget.")
        more = [path for path, k in latest.items() if k > suggested]
        if more:
            text += (f" {len(more)} layer(s) use more (e.g. {more[0]}: {latest[more[0]]}); keep their rank with "
                     f"LoraConfig(rank_pattern={{...}}).")
        return text

    def _print_table(self) -> None:
        table = Table(title=f"LoRA effective rank ({self.energy:.0%} of the energy), step {self.steps[-1]}",
                      caption=self.suggestion)
        console = Console()
        tops = {path: ", ".join(f"{v:.3g}" for v in self.spectra[path][-1][:TOP_VALUES_SHOWN])
                for path in self.effective_ranks}
        # numbers are never cut (the values wrap at their commas); names lose their middle if need be
        shown = shorten_names(tops, name_width(tops, console.width, [2, len("effective rank"), 16]))
        table.add_column("layer", no_wrap=True)
        table.add_column("r", justify="right", no_wrap=True)
        table.add_column("effective rank", justify="right", no_wrap=True)
        table.add_column(f"top {TOP_VALUES_SHOWN} singular values", justify="right", overflow="fold")
        for path, ranks in self.effective_ranks.items():
            table.add_row(shown[path], str(self.ranks[path]), str(ranks[-1]), tops[path])
        console.print(table)

    def figure(self):
        """The figure :meth:`_plot` writes (``matplotlib.figure.Figure``): the latest spectra as
        rank-vs-error curves, and the effective ranks over training."""
        from ..plots import rank_error_figure

        latest = {path: values[-1] for path, values in self.spectra.items()}
        return rank_error_figure(latest, self.ranks, step=self.steps[-1] if self.steps else None,
                                 history=(self.steps, self.effective_ranks), energy=self.energy)

    def _plot(self, path: Path) -> None:
        from ..plots import MISSING_MATPLOTLIB, save_figure

        try:
            figure = self.figure()
        except ImportError:
            rank_zero_warn(f"RankMonitor: {path} not written: {MISSING_MATPLOTLIB}; RankMonitor(plot=False) "
                           f"turns the figure off.")
            return
        self.plot_file = save_figure(figure, path)
