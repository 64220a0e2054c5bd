"""Figures (matplotlib, the ``plots`` extra): the data behind each curve, the files, and the one
message a user without matplotlib gets."""

from __future__ import annotations

import sys
import warnings

import lightning as L
import pytest
import torch

from lightning_peft import plots
from lightning_peft.callbacks import ForgettingProbe, RankMonitor
from plain_module import CausalLM, sequences

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402


def _lines(axes) -> dict[str, list]:
    return {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}


def test_rank_error_curve_is_the_error_of_the_best_rank_k_fit():
    """e(k) from the singular values equals ||dW - truncated SVD_k(dW)||_F / ||dW||_F, in float64."""
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 6, generator=generator, dtype=torch.float64) @ torch.randn(
        6, 40, generator=generator, dtype=torch.float64)  # rank 6
    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    curve = plots.rank_error_curve(s[:8].tolist())
    for k in range(9):
        best = (u[:, :k] * s[:k]) @ vt[:k]
        assert curve[k] == pytest.approx(((delta - best).norm() / delta.norm()).item(), abs=1e-9)
    assert curve[0] == 1.0 and curve[6] < 1e-7  # zero at the intrinsic rank, as in the chapter
    assert plots.rank_error_curve([0.0, 0.0]) == []


def test_rank_error_figure_draws_every_layer_and_saves_a_png(tmp_path):
    spectra = {"model.layers.0.self_attn.q_proj": [2.0, 1.0, 0.0, 0.0],
               "model.layers.0.self_attn.v_proj": [1.0, 1.0, 1.0, 1.0],
               "model.layers.1.self_attn.q_proj": [3.0, 0.0, 0.0, 0.0]}
    figure = plots.rank_error_figure(spectra, {k: 4 for k in spectra}, step=10,
                                     history=([5, 10], {k: [1, 2] for k in spectra}), energy=0.9)
    curves, ranks = figure.axes
    by_layer = {line.get_gid(): list(line.get_ydata()) for line in curves.get_lines()}
    assert set(by_layer) == set(spectra)
    assert by_layer["model.layers.1.self_attn.q_proj"] == pytest.approx([1.0, 0.0, 0.0, 0.0, 0.0])
    assert by_layer["model.layers.0.self_attn.v_proj"][2] == pytest.approx(0.5 ** 0.5)
    assert {t.get_text() for t in curves.get_legend().get_texts()} == {"q_proj", "v_proj"}  # one entry per kind
    assert len(ranks.get_lines()) == 3
    path = plots.save_figure(figure, tmp_path / "sub" / "ranks.png")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image[..., :3].std() > 0.05


def test_loss_figure_has_train_average_and_validation_curves():
    losses = [5.0 - 0.04 * i for i in range(100)]
    figure = plots.loss_figure(list(range(1, 101)), losses, [25, 50, 75, 100], [4.5, 3.5, 2.8, 2.2])
    lines = _lines(figure.axes[0])
    assert lines["train (per step)"] == losses and lines["validation"] == [4.5, 3.5, 2.8, 2.2]
    assert lines["train (mean of 5 steps)"][-1] == pytest.approx(sum(losses[-5:]) / 5)


def _fit(callbacks, tmp_path, **kwargs):
    trainer = L.Trainer(strategy="lora", accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(CausalLM(lr=3e-2), sequences(n=32), sequences(n=16))
    return trainer


def test_forgetting_probe_records_the_task_metric_and_plots_both_curves(tmp_path):
    probe = ForgettingProbe(sequences(n=8, batch=8), max_regression=10.0)
    trainer = _fit([probe], tmp_path, max_epochs=3)
    assert [h["step"] for h in probe.history] == [4, 8, 12]
    assert probe.history[-1]["task"] == pytest.approx(trainer.callback_metrics["val_loss"].item())
    assert all(h["task"] is not None for h in probe.history)
    figure = probe.figure()
    general, task = figure.axes
    assert _lines(general)["general probe loss"] == [h["loss"] for h in probe.history]
    assert _lines(general)["general, base model"] == [probe.base_loss] * 2
    assert _lines(task)["task (val_loss)"] == [h["task"] for h in probe.history]
    path = plots.save_figure(figure, tmp_path / "forgetting.png")
    assert path.stat().st_size > 10_000


def test_without_matplotlib_one_message_says_what_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"loss_figure: plots need matplotlib.*pip install 'lightning-peft\[plots\]'"):
        plots.loss_figure([1], [1.0])
    with pytest.raises(ImportError, match="RankMonitor.*pip install 'lightning-peft"):
        RankMonitor(plot_path=tmp_path / "x.png")  # asked for a figure: refused before training
    monitor = RankMonitor(every_n_steps=2)  # the default figure: one warning at fit end, no file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([monitor], tmp_path, max_steps=4, limit_val_batches=0)
    messages = [str(w.message) for w in caught if "RankMonitor" in str(w.message)]
    assert len(messages) == 1 and "pip install 'lightning-peft[plots]'" in messages[0]
    assert not (tmp_path / "rank_spectra.png").exists() and monitor.steps == [2, 4]
    RankMonitor(plot=False)  # no figure asked for: nothing to say
