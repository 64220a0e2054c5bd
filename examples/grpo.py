"""GRPO with LoRA on a 4-bit base, on a toy verifiable task.

    python examples/grpo.py                 # ~1 min on 2 CPU cores
    python examples/grpo.py --steps 20

Reward 1 when the sampled completion contains the target token, else 0. The policy samples a
group of completions per prompt; advantages are the rewards relative to the group. Mean reward
should rise well above its starting level.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_peft  # noqa: F401  (registers strategy="qlora")
from lightning_peft.alignment import GRPOModule

TARGET = 5


def contains_target(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    return (completions == TARGET).any(dim=1).float()


class RewardLog(L.Callback):
    def __init__(self):
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rewards.append(trainer.callback_metrics["train/reward"].item())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--strategy", default="qlora")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                                         initializer_range=0.1))
    prompts = torch.randint(6, 48, (64, 4), generator=torch.Generator().manual_seed(1))
    module = GRPOModule(model, contains_target, group_size=8, max_new_tokens=4, beta=0.04, lr=2e-2)
    log = RewardLog()
    trainer = L.Trainer(strategy=args.strategy, accelerator="cpu", max_steps=args.steps, callbacks=[log],
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False)
    trainer.fit(module, DataLoader(list(prompts), batch_size=4, shuffle=True))
    k = max(1, len(log.rewards) // 5)
    first, last = sum(log.rewards[:k]) / k, sum(log.rewards[-k:]) / k
    print(f"mean reward: first {k} steps {first:.2f} -> last {k} steps {last:.2f}")
    return {"first": first, "last": last, "rewards": log.rewards}


if __name__ == "__main__":
    main()
