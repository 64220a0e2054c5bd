"""Non-finite training: strategies stop (or skip) at a NaN/inf loss or adapter gradient; checkpoints
and exports never hold non-finite adapters."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft.callbacks import AdapterCheckpoint, MergeAdapters
from lightning_peft.strategy import NonFiniteTrainingError

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0)


class Tiny(L.LightningModule):
    """Loss is poisoned (``poison``: ``"loss"`` NaN, ``"inf"`` loss, ``"grad"`` inf gradient of one
    adapter tensor, loss finite) at the global steps in ``bad_steps``."""

    def __init__(self, bad_steps=(), poison="loss", inject=False):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.bad_steps, self.poison = set(bad_steps), poison
        self.seen: list[dict[str, torch.Tensor]] = []
        if inject:
            lp.inject_adapters(self.model, lp.LoraConfig(r=2, target_modules="all-linear"))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append({k: v.detach().clone() for k, v in self.named_parameters() if v.requires_grad})
        loss = nn.functional.mse_loss(self.model(x), y)
        self.log("loss", loss)
        if self.global_step in self.bad_steps:
            if self.poison == "loss":
                loss = loss * float("nan")
            elif self.poison == "inf":
                loss = loss + float("inf")
            else:
                param = next(p for n, p in self.named_parameters() if "lora_B" in n)
                loss = loss + 0 * param.register_hook(lambda g: torch.full_like(g, float("inf"))).id
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val", nn.functional.mse_loss(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)), batch_size=2)


def _strategy(**kwargs):
    return lp.PEFTStrategy(peft_config=lp.LoraConfig(r=2, target_modules="all-linear"), **kwargs)


def test_nan_loss_stops_at_that_step_naming_it_and_the_last_checkpoint(tmp_path):
    module = Tiny(bad_steps={3})
    ckpt = AdapterCheckpoint(tmp_path / "ckpt", every_n_train_steps=1)
    trainer = L.Trainer(strategy=_strategy(), max_steps=8, callbacks=[ckpt], **{**TRAINER, "enable_checkpointing": True})
    with pytest.raises(NonFiniteTrainingError, match="non-finite loss .*at global step 3") as caught:
        trainer.fit(module, _data())
    assert f"ckpt_path='{tmp_path / 'ckpt' / 'last'}'" in str(caught.value)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the bad step was not applied
    assert trainer.global_step == 3


def test_inf_gradient_with_finite_loss_stops_too():
    module = Tiny(bad_steps={2}, poison="grad")
    trainer = L.Trainer(strategy=_strategy(), max_steps=6, **TRAINER)
    with pytest.raises(NonFiniteTrainingError, match=r"gradient in 1 adapter tensors \(model\.0\.lora_B"):
        trainer.fit(module, _data())


def test_registered_names_default_to_raise():
    module = Tiny(bad_steps={1}, poison="inf")
    trainer = L.Trainer(strategy="lora", max_steps=4, **TRAINER)
    assert trainer.strategy.nonfinite == "raise"
    with pytest.raises(NonFiniteTrainingError, match="global step 1.*No checkpoint was saved yet"):
        trainer.fit(module, _data())


def test_skip_mode_skips_the_update_counts_and_stops_after_patience():
    module = Tiny(bad_steps={1, 2})
    strategy = _strategy(nonfinite="skip", nonfinite_patience=3)
    trainer = L.Trainer(strategy=strategy, max_steps=5, **TRAINER)
    with pytest.warns(UserWarning, match="step skipped"):
        trainer.fit(module, _data(n=16))
    assert strategy.nonfinite_skipped == 2 and trainer.global_step == 5
    seen = module.seen  # adapters as each step starts: steps 1 and 2 changed nothing
    for key in seen[1]:
        assert torch.equal(seen[1][key], seen[2][key]) and torch.equal(seen[2][key], seen[3][key]), key
        assert not torch.equal(seen[3][key], seen[4][key]) or "lora_B" not in key
    assert all(torch.isfinite(p).all() for p in module.parameters())

    always = Tiny(bad_steps=set(range(100)))
    trainer = L.Trainer(strategy=_strategy(nonfinite="skip", nonfinite_patience=3), max_steps=10, **TRAINER)
    with pytest.raises(NonFiniteTrainingError, match="3 steps in a row were non-finite"):
        with pytest.warns(UserWarning):
            trainer.fit(always, _data(n=32))
    assert trainer.global_step == 2


def test_bad_nonfinite_option_is_refused():
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        _strategy(nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite_patience=0"):
        _strategy(nonfinite="skip", nonfinite_patience=0)


def test_adapter_checkpoint_never_writes_or_ranks_nonfinite_adapters(tmp_path):
    # under Lightning's own strategy nothing stops the NaN: the callback must not save it
    module = Tiny(bad_steps={3}, inject=True)
    ckpt = AdapterCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, monitor="loss", mode="max", save_top_k=2)
    trainer = L.Trainer(max_steps=6, callbacks=[ckpt], **{**TRAINER, "enable_checkpointing": True})
    with pytest.warns(UserWarning, match="non-finite values"):
        trainer.fit(module, _data(n=16))
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved and all(int(name.split("step=")[1]) <= 3 for name in saved if "step=" in name), saved
    for name in saved:
        fresh = Tiny()
        lp.load_adapter(fresh.model, tmp_path / "ckpt" / name)
        assert all(torch.isfinite(p).all() for p in fresh.parameters()), name
    assert "step=" in ckpt.best_adapter_path and int(ckpt.best_adapter_path.split("step=")[1]) <= 3


def test_merge_adapters_refuses_nonfinite_weights_and_leaves_no_export(tmp_path):
    module = Tiny(bad_steps={1}, inject=True)
    trainer = L.Trainer(max_steps=3, callbacks=[MergeAdapters(tmp_path / "merged", dtype=torch.float32)], **TRAINER)
    with pytest.raises(ValueError, match="non-finite weights"):
        trainer.fit(module, _data())
    assert not (tmp_path / "merged").exists() and list(tmp_path.iterdir()) == []


def test_ddp_ranks_stop_together_when_one_rank_goes_nonfinite(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(here / "ddp_nonfinite_script.py"), str(tmp_path)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):  # rank 0's own loss was finite: it stops because rank 1's was not
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith("raised at 2: lightning-peft: non-finite ") and "global step 2" in text, text
        assert "finite=True" in text, text
