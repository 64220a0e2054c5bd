"""recipe_optimizer: AdamW over the trainable tensors, linear warm-up, cosine decay to the floor."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_peft as lp
from lightning_peft.recipe import WarmupCosine, recipe_optimizer


def closed_form(k: int, lr: float, warmup: int, total: int, floor: float) -> float:
    """The documented schedule, written out independently of the implementation."""
    if k < warmup:
        return lr * (k + 1) / (warmup + 1)
    progress = min(1.0, (k - warmup) / max(1, total - 1 - warmup))
    return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)


def lrs_per_step(config: dict, steps: int) -> list[float]:
    """The LR each optimizer step ``k`` uses, as Lightning drives an ``interval="step"`` scheduler."""
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedule_warms_up_then_decays_to_the_floor():
    # T=90, warm-up 10% -> W=9 steps; the decay spans steps 9..89 (80 intervals): quarter points at 29/49/69
    module = nn.Linear(4, 4)
    config = recipe_optimizer(module, lr=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1, total_steps=90)
    assert config["lr_scheduler"]["interval"] == "step" and config["lr_scheduler"]["frequency"] == 1
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    lrs = lrs_per_step(config, 100)
    hand = {0: 1e-3 / 10, 4: 1e-3 * 5 / 10, 8: 1e-3 * 9 / 10,   # warm-up: (k + 1) / (W + 1)
            9: 1e-3,                                           # the peak, once
            29: 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi / 4))),
            49: 1e-3 * 0.55,                                   # half-way: (1 + floor) / 2
            69: 1e-3 * (0.1 + 0.45 * (1 - math.cos(math.pi / 4))),
            89: 1e-4,                                          # the last step trains at the floor
            99: 1e-4}                                          # and past the estimate it stays there
    for k, expected in hand.items():
        assert lrs[k] == pytest.approx(expected, rel=1e-12), k
    assert lrs == pytest.approx([closed_form(k, 1e-3, 9, 90, 0.1) for k in range(100)], rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a > b for a, b in zip(lrs[9:89], lrs[10:90]))


@pytest.mark.parametrize("ratio, total, warmup", [(0.03, 5, 1), (0.03, 1000, 30), (0.07, 100, 7), (0.0, 50, 0)])
def test_warmup_steps_round_up(ratio, total, warmup):
    config = recipe_optimizer(nn.Linear(2, 2), warmup_ratio=ratio, total_steps=total)
    schedule = config["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert schedule == WarmupCosine(warmup, total, 0.1)
    lrs = lrs_per_step(config, total)
    assert lrs == pytest.approx([closed_form(k, 1e-4, warmup, total, 0.1) for k in range(total)], rel=1e-12)


def test_floor_one_is_constant_after_warmup():
    lrs = lrs_per_step(recipe_optimizer(nn.Linear(2, 2), lr=0.5, warmup_ratio=0.2, min_lr_ratio=1.0,
                                        total_steps=10), 12)
    assert lrs[:2] == pytest.approx([0.5 / 3, 1.0 / 3]) and lrs[2:] == pytest.approx([0.5] * 10)


def test_only_trainable_tensors_and_weight_decay():
    model = lp.inject_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), lp.LoraConfig(r=2))
    config = recipe_optimizer(model, weight_decay=0.01, total_steps=10)
    params = config["optimizer"].param_groups[0]["params"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(trainable) == 4 and all(a is b for a, b in zip(params, trainable))
    assert config["optimizer"].param_groups[0]["weight_decay"] == 0.01


class Regressor(L.LightningModule):
    """A module that leaves the adapters to the strategy and the optimizer to the recipe."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def training_step(self, batch, batch_idx):
        return (self.net(batch) - batch).pow(2).mean()

    def configure_optimizers(self):
        return recipe_optimizer(self, lr=1e-2, warmup_ratio=0.25, min_lr_ratio=0.1)


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs, self.params = [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.params = [p for group in optimizer.param_groups for p in group["params"]]


def test_total_steps_from_the_trainer_under_a_strategy():
    # 2 epochs x 8 batches / accumulation 2 = 8 optimizer steps; warm-up ceil(0.25 * 8) = 2
    record = RecordLR()
    trainer = L.Trainer(strategy="lora", accelerator="cpu", max_epochs=2, accumulate_grad_batches=2,
                        callbacks=[record], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    module = Regressor()
    trainer.fit(module, DataLoader(list(torch.randn(32, 16, generator=torch.Generator().manual_seed(1))),
                                   batch_size=4))
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0] == WarmupCosine(2, 8, 0.1)
    assert record.lrs == pytest.approx([closed_form(k, 1e-2, 2, 8, 0.1) for k in range(8)], rel=1e-12)
    names = {id(p): n for n, p in module.named_parameters()}
    assert record.params and all("lora_" in names[id(p)] for p in record.params)


def test_errors_say_what_to_do():
    with pytest.raises(RuntimeError, match="not attached to a Trainer.*total_steps"):
        recipe_optimizer(nn.Linear(2, 2))
    unbounded = nn.Linear(2, 2)
    unbounded._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="no step or epoch limit"):
        recipe_optimizer(unbounded)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no tensor with requires_grad=True"):
        recipe_optimizer(frozen, total_steps=10)
    for kwargs, match in [({"lr": 0}, "lr=0"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
                          ({"min_lr_ratio": -0.1}, "min_lr_ratio"), ({"weight_decay": -1}, "weight_decay"),
                          ({"total_steps": 0}, "total_steps")]:
        with pytest.raises(ValueError, match=match):
            recipe_optimizer(nn.Linear(2, 2), **{"total_steps": 10, **kwargs})
