"""ForgettingProbe, RankMonitor and ReviewSamples, each made to see what it is there to catch."""

from __future__ import annotations

import importlib.util
import math
import re
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_peft as lp
from conftest import tiny_llama
from lightning_peft.callbacks.forgetting_probe import ForgettingProbe, causal_lm_token_losses
from lightning_peft.callbacks.rank_monitor import RankMonitor, delta_singular_values, effective_rank
from lightning_peft.callbacks.review_samples import ReviewSamples
from plain_module import CausalLM, sequences


def _trainer(callbacks, strategy="lora", **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    return L.Trainer(strategy=strategy, callbacks=callbacks, **{**defaults, **kwargs})


def _narrow(rows: int) -> DataLoader:
    """The narrow task: one 16-token sequence, over and over."""
    return DataLoader(list(torch.arange(16).repeat(rows, 1)), batch_size=8)


# ---------------------------------------------------------------------------------- RankMonitor
TARGET_SINGULAR_VALUES = [1.0, 0.9, 0.8, 0.7]


class FitLowRankUpdate(L.LightningModule):
    """y = x (W0 + U S V^T)^T with a rank-4 update; LoRA r=32 on W0 learns it by MSE regression."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 64, bias=False))
        U, _ = torch.linalg.qr(torch.randn(64, 4, generator=generator))
        V, _ = torch.linalg.qr(torch.randn(64, 4, generator=generator))
        update = U @ torch.diag(torch.tensor(TARGET_SINGULAR_VALUES)) @ V.t()
        self.x = torch.randn(256, 64, generator=generator)
        self.y = self.x @ (self.model[0].weight.detach() + update).t()
        lp.inject_adapters(self.model, lp.LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=["0"]))

    def training_step(self, batch, batch_idx):
        self.mse = ((self.model(self.x) - self.y) ** 2).mean()
        return self.mse

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_rank_monitor_finds_the_intrinsic_rank_of_the_learned_update(tmp_path, capsys):
    module = FitLowRankUpdate()
    monitor = RankMonitor(every_n_steps=50)
    trainer = _trainer([monitor], strategy="auto", max_steps=150, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(range(150), batch_size=1))
    assert module.mse.item() < 1e-4  # the update is learned
    assert monitor.steps == [50, 100, 150]
    assert monitor.ranks == {"model.0": 32}
    assert abs(monitor.effective_ranks["model.0"][-1] - 4) <= 1  # measured: 4 at every step
    top = monitor.spectra["model.0"][-1]
    assert top[:4] == pytest.approx(TARGET_SINGULAR_VALUES, rel=1e-2)  # the target's spectrum, recovered
    assert top[4] < 1e-2 * top[0]
    assert trainer.callback_metrics["effective_rank/model.0"].item() == monitor.effective_ranks["model.0"][-1]
    assert "r=8 would likely do" in monitor.suggestion
    printed = capsys.readouterr().out
    assert "model.0" in printed and "r=8" in printed
    if importlib.util.find_spec("matplotlib") is not None:  # the figure: the chapter's rank-vs-error curve
        assert monitor.plot_file == tmp_path / "rank_spectra.png" and monitor.plot_file.stat().st_size > 10_000
        curves = monitor.figure().axes[0]
        (line,) = [line for line in curves.get_lines() if line.get_gid() == "model.0"]
        errors = list(line.get_ydata())
        assert len(errors) == 33 and errors[0] == 1.0 and errors[3] > 0.3 and errors[4] < 1e-2  # ~0 at rank 4

    restored = RankMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.effective_ranks == monitor.effective_ranks and restored.steps == monitor.steps


def test_delta_singular_values_equal_those_of_the_full_update():
    config = lp.LoraConfig(r=16, lora_alpha=8, init_lora_weights=False, target_modules=["0", "1", "2"])
    model = lp.inject_adapters(nn.Sequential(nn.Linear(80, 48), nn.Embedding(40, 24), nn.Linear(8, 30)), config)
    for layer in model:  # init_lora_weights=False: random A and B, as if trained
        full = torch.linalg.svdvals(layer.delta_weight("default").detach())
        ours = delta_singular_values(layer, "default")
        assert len(ours) == min(16, *layer.delta_weight("default").shape)  # the [8 -> 30] layer: rank <= 8
        assert torch.allclose(ours, full[:len(ours)], rtol=1e-4, atol=1e-6)
    assert effective_rank(torch.zeros(4), 0.9) == 0
    assert effective_rank(torch.ones(4), 0.75) == 3 and effective_rank(torch.ones(4), 0.76) == 4
    assert effective_rank(torch.tensor([3.0, 1.0]), 0.9) == 1  # 9 / 10


# ------------------------------------------------------------------------------ ForgettingProbe
class RecordingLM(CausalLM):
    """Notes whether each training step ran in train mode with gradients on (the probe must restore both)."""

    def training_step(self, batch, batch_idx):
        self.modes = getattr(self, "modes", []) + [self.model.training and torch.is_grad_enabled()]
        return super().training_step(batch, batch_idx)


def _forgetting_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("ForgettingProbe")]


def test_forgetting_probe_reports_the_regression_from_narrow_training():
    probe_set = sequences(n=16, batch=16)  # general data: random token sequences
    probe = ForgettingProbe(probe_set, max_regression=0.05)
    module = RecordingLM(lr=3e-2)
    with torch.no_grad():  # the base score is the untouched model's loss on the probe set
        expected_base = CausalLM().model(input_ids=next(iter(probe_set)), labels=next(iter(probe_set))).loss.item()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer([probe], max_epochs=2)  # no validation: measured at each epoch end
        trainer.fit(module, _narrow(160))
    assert probe.base_loss == pytest.approx(expected_base, rel=1e-5)
    assert [h["step"] for h in probe.history] == [20, 40]
    last = probe.history[-1]
    assert last["regression"] > 0.05  # measured: 0.086, 0.125 (probe loss 5.19 -> 5.85)
    assert last["perplexity"] == pytest.approx(math.exp(last["loss"]))
    assert trainer.callback_metrics["forgetting/regression"].item() == pytest.approx(last["regression"])
    assert trainer.callback_metrics["forgetting/probe_perplexity"].item() == pytest.approx(last["perplexity"])
    new_highs = [h for i, h in enumerate(probe.history)
                 if h["regression"] > 0.05 and all(h["regression"] > p["regression"] for p in probe.history[:i])]
    messages = _forgetting_warnings(caught)
    assert len(messages) == len(new_highs) >= 1  # once per new high
    assert "silent capability loss" in messages[0] and "mix general data" in messages[0]
    assert all(module.modes)  # train mode and gradients were back for every step


def test_forgetting_probe_with_stop_ends_the_run_with_its_message():
    probe = ForgettingProbe(sequences(n=16, batch=16), max_regression=0.01, stop=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer([probe], max_epochs=2, val_check_interval=5)
        trainer.fit(CausalLM(lr=3e-2), _narrow(160), _narrow(8))
    assert trainer.global_step == probe.history[-1]["step"] < 40  # stopped at the first check past the limit
    assert probe.history[-1]["regression"] > 0.01  # measured: 0.028 at step 5
    messages = _forgetting_warnings(caught)
    assert len(messages) == 1 and "Stopping the run (stop=True)" in messages[0]


def test_default_probe_loss_scores_tokens_like_the_model_loss():
    model = tiny_llama()
    lp.inject_adapters(model, lp.LoraConfig(r=4))
    holder = nn.Module()
    holder.model = model  # adapters live in the child, as under a lightning-peft strategy
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        tokens = causal_lm_token_losses(holder, ids)
        assert tokens.shape == (3 * 9,)
        assert tokens.mean().item() == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)
        mask = torch.ones_like(ids)
        mask[:, 7:] = 0  # padding: not scored
        padded = causal_lm_token_losses(holder, {"input_ids": ids, "attention_mask": mask})
        assert padded.shape == (3 * 6,)
    with pytest.raises(TypeError, match="loss_fn"):
        causal_lm_token_losses(holder, [ids])


# -------------------------------------------------------------------------------- ReviewSamples
class Characters:
    """A tokenizer with one token per character (ids < 128)."""

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _rows(markdown: str) -> list[list[str]]:
    """The generation rows of a review file: [adapters on, adapters off] per prompt."""
    rows = [line for line in markdown.split("\n") if line.startswith("| ") and "adapters on" not in line]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_review_samples_writes_both_generations_of_every_prompt_per_evaluation(tmp_path):
    text = torch.tensor(Characters().encode("the cat sat on the mat. ")).repeat(80, 1)
    prompts = ["the cat", Characters().encode("on the")]
    review = ReviewSamples(prompts, max_new_tokens=12, tokenizer=Characters(), dirpath=tmp_path)
    loader = DataLoader(list(text), batch_size=8)
    _trainer([review], max_epochs=2).fit(CausalLM(lr=3e-2), loader, DataLoader(list(text[:8]), batch_size=8))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["review-epoch=0-step=10.md", "review-epoch=1-step=20.md"]
    assert review.files == [tmp_path / "review-epoch=0-step=10.md", tmp_path / "review-epoch=1-step=20.md"]
    generations = []
    for path in review.files:
        markdown = path.read_text()
        assert "```\nthe cat\n```" in markdown and "```\non the\n```" in markdown
        rows = _rows(markdown)
        assert len(rows) == 2 and all(len(row) == 2 and all(row) for row in rows)
        generations.append(rows)
    assert any(on != off for rows in generations for on, off in rows)  # adapters really were toggled
    assert [off for _, off in generations[0]] == [off for _, off in generations[1]]  # the base did not move


def test_review_samples_shows_token_ids_without_a_tokenizer(tmp_path):
    review = ReviewSamples([[5, 6, 7]], max_new_tokens=4)  # default dirpath: the checkpoint folder
    trainer = _trainer([review], max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(CausalLM(), sequences(n=16))
    (path,) = review.files
    assert path.parent == tmp_path / "checkpoints" and path.name == "review-epoch=0-step=2.md"
    markdown = path.read_text()
    assert "```\n[5, 6, 7]\n```" in markdown
    ((on, off),) = _rows(markdown)
    assert re.fullmatch(r"\[\d+(, \d+)*\]", on) and re.fullmatch(r"\[\d+(, \d+)*\]", off)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("build, error, match", [
    (lambda: ForgettingProbe("text"), TypeError, "iterable of probe batches"),
    (lambda: ForgettingProbe([], max_regression=-0.1), ValueError, "relative loss increase"),
    (lambda: RankMonitor(every_n_steps=0), ValueError, "every_n_steps"),
    (lambda: RankMonitor(energy=1.5), ValueError, r"in \(0, 1\]"),
    (lambda: ReviewSamples(["hello"]), ValueError, "string prompts need a tokenizer"),
    (lambda: ReviewSamples([]), ValueError, "non-empty list"),
    (lambda: ReviewSamples([[1, 2]], max_new_tokens=0), ValueError, "max_new_tokens"),
])
def test_bad_arguments_are_refused_with_the_fix(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_callbacks_without_adapters_say_what_to_do():
    for callback in (ForgettingProbe(sequences(n=8)), ReviewSamples([[1, 2]]), RankMonitor(every_n_steps=1)):
        with pytest.raises(RuntimeError, match="strategy='lora'"):
            _trainer([callback], strategy="auto", max_steps=1).fit(CausalLM(), sequences(n=8))

