"""Quick start: LoRA on a tiny Llama with plain PyTorch, save in the HF PEFT format, reload, merge.

    python examples/quickstart.py              # ~10 s on 2 CPU cores
    python examples/quickstart.py --steps 20   # shorter

The model is built from a config (no download). It learns to continue a handful of fixed token
sequences; only the adapters train, the base stays bit-for-bit frozen.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_peft as lp


def base_model(config: LlamaConfig) -> LlamaForCausalLM:
    """Stands in for a pretrained checkpoint: the same weights every call."""
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dora", action="store_true", help="DoRA instead of plain LoRA")
    args = parser.parse_args(argv)

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = base_model(config)
    data = torch.randint(0, config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))

    # 1. adapters on every linear layer but the head (trained fully: a copy); the rest is frozen
    lp.inject_adapters(model, lp.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, use_dora=args.dora,
                                            modules_to_save=["lm_head"]))
    lp.adapter_report(model)

    # 2. train: any loop works, the adapters are ordinary parameters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    first = last = None
    for step in range(args.steps):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {last:.4f}")
    model.eval()

    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        # 3. save: adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel too
        lp.save_adapter(model, directory)
        fresh = lp.load_adapter(base_model(config).eval(), directory)
        reload_diff = (fresh(data).logits - model(data).logits).abs().max().item()

        # 4. merge for serving: one matmul per layer, same function
        two_path = model(data).logits
        lp.merge_adapters(model)
        merge_diff = (model(data).logits - two_path).abs().max().item()

    print(f"loss {first:.3f} -> {last:.3f}; reloaded adapter max |diff| {reload_diff:.2e}; "
          f"merged max |diff| {merge_diff:.2e}")
    return {"first_loss": first, "last_loss": last, "reload_diff": reload_diff, "merge_diff": merge_diff}


if __name__ == "__main__":
    main()
