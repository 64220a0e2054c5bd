r"""Figures of a run, drawn with matplotlib (the optional ``plots`` extra:
``pip install 'lightning-peft[plots]'``; the ``demo`` extra includes it).

- :func:`loss_figure`: training loss per step (and its moving average) with the validation loss.
- :func:`rank_error_figure`: for each LoRA layer, the relative error of the best rank-``k``
  approximation of its learned update ``delta W = s B A`` against ``k`` (Eckart-Young: from the
  singular values alone),

      e(k) = ||delta W - best rank-k fit||_F / ||delta W||_F = sqrt(sum_{i>k} sigma_i^2 / sum_i sigma_i^2),

  the figure of the chapter's "rank vs capacity" experiment: ``e`` reaches 0 at the update's
  intrinsic rank, and a curve that is near 0 well before ``r`` says a smaller rank would do.
- :func:`forgetting_figure`: :class:`~lightning_peft.callbacks.ForgettingProbe`'s general probe
  loss against the task's validation loss over training.

Every figure is a ``matplotlib.figure.Figure`` (no pyplot, no display needed); :func:`save_figure`
writes it as a PNG atomically. Without matplotlib each function raises one ``ImportError`` that
says how to install it. The numbers behind the figures also go to Lightning's loggers (a
``CSVLogger``'s ``metrics.csv``, TensorBoard), for plotting them another way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING_MATPLOTLIB = ("plots need matplotlib, which is not installed: pip install 'lightning-peft[plots]' "
                      "(or pip install matplotlib)")


def require_matplotlib(what: str = "lightning-peft") -> Any:
    """``matplotlib.figure.Figure``, or an ``ImportError`` naming ``what`` needed it and how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"{what}: {MISSING_MATPLOTLIB}.") from None
    return Figure


def rank_error_curve(singular_values: Sequence[float]) -> list[float]:
    """``[e(0), e(1), ..., e(n)]``: the relative Frobenius error of the best rank-``k`` fit of a
    matrix with these singular values (descending), ``e(0) = 1`` and ``e(n) = 0``. All zeros
    (an untrained update, B = 0): an empty list (the error is undefined)."""
    power = [float(s) ** 2 for s in singular_values]
    total = sum(power)
    if total == 0:
        return []
    tails = [0.0]  # sums of the smallest values first: no cancellation near the intrinsic rank
    for p in reversed(power):
        tails.append(tails[-1] + p)
    return [1.0] + [math.sqrt(tail / total) for tail in reversed(tails[:-1])]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_figure(train_steps: Sequence[int], train_losses: Sequence[float], val_steps: Sequence[int] = (),
                val_losses: Sequence[float] = (), title: str = "loss") -> Any:
    """Training loss per step (thin), its moving average, and the validation loss (markers)."""
    Figure = require_matplotlib("loss_figure")
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    if train_losses:
        axes.plot(train_steps, train_losses, color="0.7", linewidth=0.8, label="train (per step)")
        window = max(1, len(train_losses) // 20)
        if window > 1:
            axes.plot(train_steps, moving_average(list(train_losses), window), color="C0", linewidth=2,
                      label=f"train (mean of {window} steps)")
    if val_losses:
        axes.plot(val_steps, val_losses, color="C3", marker="o", linewidth=2, label="validation")
    axes.set(title=title, xlabel="optimizer step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def _kind(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``: one colour per kind of layer."""
    return path.rsplit(".", 1)[-1]


def rank_error_figure(spectra: Mapping[str, Sequence[float]], ranks: Mapping[str, int] | None = None,
                      step: int | None = None, history: tuple[Sequence[int], Mapping[str, Sequence[int]]] | None = None,
                      energy: float | None = None) -> Any:
    """Left: :func:`rank_error_curve` of every layer's update (``spectra``: ``{layer: singular
    values}``), one colour per kind of layer (``q_proj``, ``v_proj``, ...). Right, with
    ``history = (steps, {layer: effective ranks})``: the effective rank over training."""
    Figure = require_matplotlib("rank_error_figure")
    figure = Figure(figsize=(12, 4.5) if history else (7, 4.5), layout="constrained")
    panels = figure.subplots(1, 2 if history else 1)
    curves = panels[0] if history else panels
    kinds = sorted({_kind(path) for path in spectra})
    colours = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    labelled: set[str] = set()
    widest = 1
    for path, sigma in spectra.items():
        curve = rank_error_curve(sigma)
        if not curve:
            continue
        kind = _kind(path)
        curves.plot(range(len(curve)), curve, color=colours[kind], alpha=0.7, marker=".", gid=path,
                    label=None if kind in labelled else kind)
        labelled.add(kind)
        widest = max(widest, len(curve) - 1)
    curves.set(title="best rank-k fit of each learned update s·B·A" + (f" (step {step})" if step is not None else ""),
               xlabel="rank k", ylabel="relative error ||ΔW - ΔW_k||_F / ||ΔW||_F", ylim=(-0.02, 1.02),
               xlim=(0, widest))
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.grid(alpha=0.3)
    if labelled:
        curves.legend(title="layer kind", fontsize="small")
    else:
        curves.text(0.5, 0.5, "every update is zero (B = 0): untrained", ha="center", transform=curves.transAxes)
    if history:
        steps, effective = history
        ranks_axis = panels[1]
        for path, values in effective.items():
            ranks_axis.plot(steps[-len(values):], values, color=colours.get(_kind(path), "C0"), alpha=0.6, gid=path)
        top = max((ranks or {}).values(), default=0) or max((max(v) for v in effective.values() if v), default=1)
        ranks_axis.set(title="effective rank" + (f" ({energy:.0%} of the energy)" if energy else ""),
                       xlabel="optimizer step", ylabel="rank", ylim=(0, top + 0.5))
        ranks_axis.yaxis.get_major_locator().set_params(integer=True)
        ranks_axis.grid(alpha=0.3)
    return figure


def forgetting_figure(history: Sequence[Mapping[str, float]], base_loss: float | None,
                      task_metric: str = "val_loss") -> Any:
    """:class:`~lightning_peft.callbacks.ForgettingProbe`'s ``history``: the general probe loss
    (left axis, with the base model's as a dashed line) and the task's validation loss (right
    axis, where recorded) over optimizer steps. Forgetting shows as the two curves parting."""
    Figure = require_matplotlib("forgetting_figure")
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    general = figure.subplots()
    steps = [record["step"] for record in history]
    general.plot(steps, [record["loss"] for record in history], color="C3", marker="o", label="general probe loss")
    if base_loss is not None:
        general.axhline(base_loss, color="C3", linestyle="--", alpha=0.6, label="general, base model")
    general.set(title="general capability vs task (ForgettingProbe)", xlabel="optimizer step",
                ylabel="general probe loss")
    general.grid(alpha=0.3)
    handles, labels = general.get_legend_handles_labels()
    task = [(record["step"], record["task"]) for record in history if record.get("task") is not None]
    if task:
        task_axis = general.twinx()
        task_axis.plot(*zip(*task), color="C0", marker="s", label=f"task ({task_metric})")
        task_axis.set_ylabel(f"task {task_metric}")
        more_handles, more_labels = task_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    general.legend(handles, labels, loc="best")
    return figure


def save_figure(figure: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``figure`` as a PNG at ``path`` (folders created; atomic). Returns the path."""
    from .atomic import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))
    return path
