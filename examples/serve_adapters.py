"""Serve several fine-tunes from one 4-bit base: mixed-adapter batches, generation, hot swap.

    python examples/serve_adapters.py              # ~15 s on 2 CPU cores
    python examples/serve_adapters.py --steps 30   # shorter

Three LoRA adapters are trained on one NF4 base, each to continue its own fixed token sequence
(a stand-in for three customers' fine-tunes), and saved. A server process would then load the
base once and every adapter by name, and answer requests for all of them, and for the plain base,
in one batch: ``lp.adapter_ids`` names each row's adapter. The script checks what a server relies
on: each row of the mixed batch gets what its adapter alone would give, and an adapter's weights
can be replaced in place (``hot_swap_adapter``) while the model keeps every tensor it had.
The model is built from a config (no download); see docs/multi-adapter.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_peft as lp

PROMPT, ANSWER = 4, 8  # each request gives its sequence's first 4 tokens and expects the next 8


def base_model(config: LlamaConfig, quant: lp.QuantConfig) -> LlamaForCausalLM:
    """Stands in for a pretrained checkpoint, loaded in 4 bits: the same weights every call."""
    torch.manual_seed(0)
    return lp.quantize_base(LlamaForCausalLM(config), quant)


def answers(model, prompts: torch.Tensor) -> torch.Tensor:
    """Greedy continuations ``[rows, ANSWER]`` (pad = eos = 0; no row stops early at this length)."""
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=ANSWER,
                         min_new_tokens=ANSWER, do_sample=False, pad_token_id=0, eos_token_id=0)
    return out[:, PROMPT:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per adapter")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         initializer_range=0.1)  # logits in a trained model's range
    quant = lp.QuantConfig(compute_dtype=torch.float32)  # fp32 compute: the checks below compare exactly
    names = ["task0", "task1", "task2"]
    tasks = torch.randint(1, config.vocab_size, (len(names), PROMPT + ANSWER),
                          generator=torch.Generator().manual_seed(1))

    with tempfile.TemporaryDirectory() as tmp:
        # 1. train: one named adapter per task on one NF4 base; set_adapter makes only it trainable
        model = base_model(config, quant)
        for name, sequence in zip(names, tasks):
            lp.inject_adapters(model, lp.LoraConfig(r=args.rank, lora_alpha=2 * args.rank), adapter_name=name)
            lp.set_adapter(model, name)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
            batch = sequence.expand(4, -1)
            model.train()
            for _ in range(args.steps):
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            lp.save_adapter(model, Path(tmp) / name, adapter_name=name)
            print(f"{name}: trained {args.steps} steps, final loss {model(input_ids=batch, labels=batch).loss.item():.4f}")

        # 2. the server: the base once, every adapter by name
        server = base_model(config, quant).eval()
        for name in names:
            lp.load_adapter(server, Path(tmp) / name, adapter_name=name)

        # 3. one batch for everyone: row n runs adapter ids[n] (None: the base model)
        ids = ["task0", "task2", None, "task1", "task2", "task0"]
        task_of = [names.index(i) if i else 0 for i in ids]
        prompts = tasks[task_of, :PROMPT]
        with torch.no_grad():
            with lp.adapter_ids(server, ids):
                logits = server(prompts).logits
                mixed = answers(server, prompts)
            # the same rows one adapter at a time
            alone_logits, alone = [], []
            for n, name in enumerate(ids):
                with lp.use_adapter(server, name) if name else lp.disable_adapters(server):
                    alone_logits.append(server(prompts[n:n + 1]).logits)
                    alone.append(answers(server, prompts[n:n + 1]))
        expected = tasks[task_of, PROMPT:]
        adapter_rows = [n for n, i in enumerate(ids) if i]
        accuracy = (mixed[adapter_rows] == expected[adapter_rows]).float().mean().item()
        base_accuracy = (mixed[ids.index(None)] == expected[ids.index(None)]).float().mean().item()
        logit_diff = (logits - torch.cat(alone_logits)).abs().max().item()
        same_tokens = torch.equal(mixed, torch.cat(alone))
        print(f"mixed batch: adapter rows answer {accuracy:.0%} of tokens right, the base row {base_accuracy:.0%}; "
              f"max |logit diff| to each row alone {logit_diff:.1e}; same generated tokens: {same_tokens}")

        # 4. hot swap: task1's slot now serves task2's weights (same shapes), in place
        pointers = {n: p.data_ptr() for n, p in server.named_parameters()}
        lp.hot_swap_adapter(server, Path(tmp) / "task2", adapter_name="task1")
        kept = pointers == {n: p.data_ptr() for n, p in server.named_parameters()}
        with torch.no_grad(), lp.adapter_ids(server, ["task1"]):
            swapped = answers(server, tasks[2:3, :PROMPT])
        swapped_accuracy = (swapped == tasks[2:3, PROMPT:]).float().mean().item()
        print(f"hot swap: task1 now answers task2's prompt {swapped_accuracy:.0%} right; every tensor kept: {kept}")

    return {"accuracy": accuracy, "base_accuracy": base_accuracy, "logit_diff": logit_diff,
            "same_tokens": same_tokens, "swapped_accuracy": swapped_accuracy, "pointers_kept": kept}


if __name__ == "__main__":
    main()
