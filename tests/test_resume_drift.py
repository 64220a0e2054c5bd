"""Resuming under another adapter config, quantization or optimizer is refused with every
differing field (or the fix), instead of silently training another function."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_peft as lp
from lightning_peft.callbacks import PagedOptimizer

TRAINER = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
           "enable_progress_bar": False, "enable_model_summary": False}


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)), batch_size=4)


def _lora(**changes):
    return lp.LoraConfig(**{"r": 4, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", **changes})


def _fit(strategy, max_steps, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(strategy=strategy, max_steps=max_steps, callbacks=list(callbacks), **TRAINER)
    trainer.fit(Tiny(), _data(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("drift")
    _fit(lp.PEFTStrategy(peft_config=_lora()), 2).save_checkpoint(out / "lora.ckpt")
    _fit(lp.PEFTStrategy(peft_config=_lora(), quantization="nf4"), 2).save_checkpoint(out / "qlora.ckpt")
    _fit(lp.PEFTStrategy(peft_config=_lora()), 2, callbacks=[PagedOptimizer("paged_adamw")]).save_checkpoint(
        out / "paged.ckpt")
    return out


@pytest.mark.parametrize("changes, expected", [
    ({"lora_alpha": 64}, ["lora_alpha: checkpoint 32, strategy 64"]),
    ({"use_rslora": True}, ["use_rslora: checkpoint False, strategy True"]),
    ({"use_dora": True}, ["use_dora: checkpoint False, strategy True"]),
    ({"r": 8}, ["r: checkpoint 4, strategy 8"]),
    ({"target_modules": ["0"]}, ["target_modules: checkpoint ['0', '2'], strategy ['0']"]),
    ({"lora_alpha": 64, "use_rslora": True}, ["lora_alpha: checkpoint 32, strategy 64",
                                              "use_rslora: checkpoint False, strategy True"]),
])
def test_resume_with_another_adapter_config_lists_every_differing_field(checkpoints, changes, expected):
    with pytest.raises(ValueError, match="cannot resume") as caught:
        _fit(lp.PEFTStrategy(peft_config=_lora(**changes)), 3, ckpt_path=checkpoints / "lora.ckpt")
    message = str(caught.value)
    for line in expected:
        assert line in message, message
    assert message.count(": checkpoint ") == len(expected), message  # nothing else listed


def test_resume_qlora_under_lora_and_the_reverse_is_refused(checkpoints):
    with pytest.raises(ValueError, match=r"quantization: checkpoint nf4 .*strategy none \(float base\)"):
        _fit(lp.PEFTStrategy(peft_config=_lora()), 3, ckpt_path=checkpoints / "qlora.ckpt")
    with pytest.raises(ValueError, match=r"quantization: checkpoint none \(float base\), strategy nf4"):
        _fit(lp.PEFTStrategy(peft_config=_lora(), quantization="nf4"), 3, ckpt_path=checkpoints / "lora.ckpt")
    with pytest.raises(ValueError, match=r"quantization.quant_type: checkpoint 'nf4', strategy 'fp4'"):
        _fit(lp.PEFTStrategy(peft_config=_lora(), quantization="fp4"), 3, ckpt_path=checkpoints / "qlora.ckpt")


def test_resume_with_the_same_settings_still_works(checkpoints):
    trainer = _fit(lp.PEFTStrategy(peft_config=_lora(), quantization="nf4"), 3, ckpt_path=checkpoints / "qlora.ckpt")
    assert trainer.global_step == 3


def test_paged_optimizer_state_without_the_callback_is_refused_with_the_fix(checkpoints):
    with pytest.raises(ValueError, match=r"PagedOptimizer\(optimizer='paged_adamw'\)\] as in the run"):
        _fit(lp.PEFTStrategy(peft_config=_lora()), 3, ckpt_path=checkpoints / "paged.ckpt")
    trainer = _fit(lp.PEFTStrategy(peft_config=_lora()), 3, ckpt_path=checkpoints / "paged.ckpt",
                   callbacks=[PagedOptimizer("paged_adamw")])
    assert trainer.global_step == 3
