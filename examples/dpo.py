"""DPO with LoRA on a 4-bit base: the reference model is the same model with adapters off.

    python examples/dpo.py                  # ~1 min on 2 CPU cores
    python examples/dpo.py --steps 30

Toy preference data: after a random prompt, two completions share their first tokens and differ in
the last one; the chosen one ends in token 7. Preference accuracy on held-out pairs (does the
policy give the chosen completion the higher log-probability?) starts near chance and should end
near 1.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_peft  # noqa: F401  (registers strategy="qlora")
from lightning_peft.alignment import DPOModule, PreferenceCollator, sequence_logprobs

PREFERRED = 7


def preference_pairs(n: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(10, vocab, (6,), generator=g).tolist()
        stem = torch.randint(10, vocab, (3,), generator=g).tolist()
        other = int(torch.randint(10, vocab, (1,), generator=g))
        pairs.append({"prompt": prompt, "chosen": stem + [PREFERRED], "rejected": stem + [other]})
    return pairs


@torch.no_grad()
def preference_accuracy(model: torch.nn.Module, pairs: list[dict]) -> float:
    """Fraction of pairs whose chosen completion gets the higher log-probability."""
    batch = PreferenceCollator()(pairs)
    was_training = model.training
    model.eval()  # and back after: a model left in eval mode would train without its LoRA dropout
    try:
        logps = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels_mask"]).sum
    finally:
        model.train(was_training)
    half = len(pairs)
    return (logps[:half] > logps[half:]).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--strategy", default="qlora")
    args = parser.parse_args(argv)

    torch.manual_seed(0)  # stands in for a pretrained model
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         initializer_range=0.1))
    train, held_out = preference_pairs(64, 64, seed=1), preference_pairs(64, 64, seed=2)
    before = preference_accuracy(model, held_out)
    module = DPOModule(model, beta=0.1, lr=1e-2)
    trainer = L.Trainer(strategy=args.strategy, accelerator="cpu", max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, DataLoader(train, batch_size=16, shuffle=True, collate_fn=PreferenceCollator()))
    after = preference_accuracy(module.model, held_out)
    print(f"held-out preference accuracy: {before:.2f} -> {after:.2f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
