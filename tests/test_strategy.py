"""Trainer(strategy="qlora") on a LightningModule that never imports lightning_peft."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.quantize import is_quantized
from lightning_peft.strategy import adapter_state_keys
from plain_module import CausalLM, sequences


def _trainer(strategy, **kwargs):
    defaults = dict(accelerator=os.environ.get("LP_TEST_ACCELERATOR", "cpu"), devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(strategy=strategy, **{**defaults, **kwargs})


def test_qlora_flag_trains_adapters_only_and_checkpoint_has_no_base(tmp_path):
    module = CausalLM(hidden=128, vocab=1000)
    float_base_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    trainer = _trainer("qlora", max_steps=6)
    trainer.fit(module, sequences(n=8, vocab=1000))  # one batch, seen 6 times

    assert any(is_quantized(m) for m in module.modules())
    adapters = {id(p) for p in module.parameters() if p.requires_grad}
    in_optimizer = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert adapters and {id(p) for p in in_optimizer} == adapters and len(in_optimizer) == len(adapters)
    assert module.losses[-1] < module.losses[0]

    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert keys == adapter_state_keys(module) and all(".lora_" in k for k in keys)
    adapter_bytes = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    # adapters + two AdamW moments + bookkeeping; the float base alone would be larger than all of it
    assert path.stat().st_size < 3 * adapter_bytes + 200_000 < float_base_bytes
    assert checkpoint["lightning_peft"]["quantization"]["quant_type"] == "nf4"


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
def test_precisions_with_accumulation_and_gradient_checkpointing(precision):
    module = CausalLM(gradient_checkpointing=True)
    trainer = _trainer("qlora", precision=precision, max_steps=8, accumulate_grad_batches=2)
    trainer.fit(module, sequences(n=16))  # two batches per optimizer step
    assert len(module.losses) == 16 and all(torch.isfinite(torch.tensor(module.losses)))
    assert sum(module.losses[-2:]) < sum(module.losses[:2])
    assert module.model.model.gradient_checkpointing


def test_validate_after_fit_does_not_inject_twice():
    module = CausalLM()
    trainer = _trainer("lora", max_steps=2)
    trainer.fit(module, sequences())
    trainer.validate(module, sequences(n=16))  # runs strategy.setup again
    assert list(lp.adapter_configs(module)) == ["default"]
    assert not any(isinstance(m.base_layer, lp.methods.LoraLayer)
                   for m in module.modules() if isinstance(m, lp.methods.LoraLayer))


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(strategy, tmp_path):
    L.seed_everything(0)
    straight = CausalLM()
    _trainer(strategy, max_epochs=2).fit(straight, sequences())
    assert len(straight.losses) == 20

    L.seed_everything(0)
    first = CausalLM()
    trainer = _trainer(strategy, max_epochs=1)
    trainer.fit(first, sequences())
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")

    L.seed_everything(0)
    resumed = CausalLM()
    _trainer(strategy, max_epochs=2).fit(resumed, sequences(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert len(resumed.losses) == 10
    diffs = [abs(a - b) for a, b in zip(resumed.losses, straight.losses[10:])]
    assert max(diffs) <= 1e-6, diffs


def test_load_from_checkpoint_then_restore_adapters(tmp_path):
    module = CausalLM()
    trainer = _trainer("qlora", max_steps=4)
    trainer.fit(module, sequences())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        trained = module.eval()(x)

    reloaded = CausalLM.load_from_checkpoint(tmp_path / "run.ckpt", strict=False)
    lp.restore_adapters(reloaded, tmp_path / "run.ckpt")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), trained)


# ------------------------------------------------------------------------------------ bad input
class NoLinear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)

    def training_step(self, batch, batch_idx):
        return self.embedding(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("strategy, message", [("lora", "all-linear.*found no nn.Linear"),
                                                ("qlora", "no nn.Linear layer to quantize.*strategy='lora'")])
def test_model_without_linear_layers_is_refused(strategy, message):
    with pytest.raises(ValueError, match=message):
        _trainer(strategy, max_steps=1).fit(NoLinear(), sequences(n=8, vocab=10))


def test_ddp_spawn_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="start_method='popen'.*qlora_ddp"):
        lp.PEFTDDPStrategy(start_method="spawn")


def test_two_devices_on_a_single_device_strategy_point_to_ddp():
    with pytest.raises(ValueError, match="strategy='qlora_ddp'"):
        _trainer("qlora", devices=2)


def test_resuming_with_other_adapter_shapes_lists_them(tmp_path):
    module = CausalLM()
    trainer = _trainer(lp.PEFTStrategy(peft_config=lp.LoraConfig(r=4)), max_steps=2)
    trainer.fit(module, sequences())
    trainer.save_checkpoint(tmp_path / "r4.ckpt")
    with pytest.raises(ValueError) as err:
        _trainer(lp.PEFTStrategy(peft_config=lp.LoraConfig(r=8)), max_steps=4).fit(
            CausalLM(), sequences(), ckpt_path=tmp_path / "r4.ckpt")
    message = str(err.value)
    # the differing config field is named before any key or shape would be (tests/test_resume_drift.py)
    assert "cannot resume" in message and "r: checkpoint 4, strategy 8" in message
    assert "Resume with the settings the checkpoint was written with" in message


@pytest.mark.parametrize("mode, lora_dropout, warns", [
    ("eval", 0.05, True),    # a from_pretrained model: eval mode, which Lightning keeps
    ("train", 0.05, False),
    ("eval", 0.0, False),    # no dropout to lose
])
def test_adapter_dropout_left_off_by_eval_mode_is_reported(mode, lora_dropout, warns):
    module = CausalLM()
    module.model.train(mode == "train")
    with pytest.warns() as caught:
        _trainer(lp.PEFTStrategy(peft_config=lp.LoraConfig(r=4, lora_dropout=lora_dropout)), max_steps=1).fit(
            module, sequences())
    ours = [str(w.message) for w in caught if "adapter dropout modules" in str(w.message)]
    if warns:
        # 2 layers x 7 linear layers
        assert len(ours) == 1 and "14 adapter dropout modules (p=0.05) are in eval mode" in ours[0]
        assert "model.train() before trainer.fit" in ours[0] and "lora_dropout=0" in ours[0]
    else:
        assert not ours
