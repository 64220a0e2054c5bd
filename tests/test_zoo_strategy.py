"""Switching method is switching config: every method under Trainer(strategy=PEFTStrategy(...)),
on a LightningModule that never imports lightning_peft, with a checkpoint that resumes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_peft as lp
from lightning_peft.strategy import adapter_state_keys
from plain_module import CausalLM, sequences

CONFIGS = {
    "ia3": lambda: lp.IA3Config(),
    "bitfit": lambda: lp.BitFitConfig(),
    "prompt": lambda: lp.PromptTuningConfig(num_virtual_tokens=4),
    "prefix_projection": lambda: lp.PrefixTuningConfig(num_virtual_tokens=4, projection=True),
    "bottleneck": lambda: lp.BottleneckConfig(reduction_factor=8),
}


def _trainer(config, quantization=None, **kwargs):
    return L.Trainer(strategy=lp.PEFTStrategy(peft_config=config, quantization=quantization), accelerator="cpu",
                     devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_each_method_trains_under_the_strategy_and_resumes(method, tmp_path):
    quantization = "nf4" if method == "bitfit" else None
    module = CausalLM(lr=5e-2)
    trainer = _trainer(CONFIGS[method](), quantization, max_steps=4)
    trainer.fit(module, sequences(n=8))  # one batch, seen 4 times
    assert module.losses[-1] < module.losses[0]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert trainable and in_optimizer == trainable
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == adapter_state_keys(module)

    resumed = CausalLM(lr=5e-2)
    _trainer(CONFIGS[method](), quantization, max_steps=5).fit(resumed, sequences(n=8), ckpt_path=tmp_path / "run.ckpt")
    straight = CausalLM(lr=5e-2)
    _trainer(CONFIGS[method](), quantization, max_steps=5).fit(straight, sequences(n=8))
    # no dropout in these methods: the resumed 5th step is the uninterrupted run's 5th step
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)
