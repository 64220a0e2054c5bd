"""Run by tests/test_fsdp.py on 2 CPU processes (gloo): a sharded lightning-peft run, launched by
Lightning's popen launcher (``devices=2``) or by torchrun as 2 simulated nodes (``num_nodes=2``).

    python fsdp_script.py OUT STRATEGY[,STRATEGY...] STEPS [--nodes 2] [--resume DIR] [--ckpt-every N]
                          [--dropout P]

Several strategies run one after another in the same processes. For each, under ``OUT/STRATEGY``,
each rank writes ``rank{r}.json`` (its per-step losses, the bytes of the frozen base it holds
against the whole base's, logits of a fixed batch from the sharded model) and
``adapters_rank{r}.safetensors`` (the adapter tensors as gathered on that rank). An
``AdapterCheckpoint`` writes PEFT-format saves under ``OUT/STRATEGY/ckpt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
import lightning_peft as lp  # noqa: E402
from lightning_peft.callbacks import AdapterCheckpoint  # noqa: E402
from lightning_peft.fsdp import gathered_adapters  # noqa: E402
from plain_module import CausalLM, sequences  # noqa: E402

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
QUANT = dict(quant_type="nf4", double_quant=True, compute_dtype=torch.float32)
PROBE = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def strategy(name: str, dropout: float):
    lora = lp.LoraConfig(**{**LORA, "lora_dropout": dropout})
    if name == "lora_fsdp":
        return lp.PEFTFSDPStrategy(peft_config=lora)
    if name == "qlora_fsdp":
        return lp.PEFTFSDPStrategy(peft_config=lora, quantization=lp.QuantConfig(**QUANT))
    if name == "lora_ddp":
        return lp.PEFTDDPStrategy(peft_config=lora)
    raise SystemExit(f"unknown strategy {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("strategies", help="one name, or several separated by commas: run one after another")
    parser.add_argument("steps", type=int)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    for name in args.strategies.split(","):
        run(args, name)


def run(args, name: str) -> None:
    # ranks build different random models on purpose: the strategy must start them all from rank 0's
    rank_env = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    module = CausalLM(seed=100 * rank_env)
    out = args.out / name
    callbacks = []
    if args.ckpt_every:
        callbacks.append(AdapterCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.ckpt_every,
                                           save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(strategy=strategy(name, args.dropout), accelerator="cpu", devices=2 // args.nodes,
                        num_nodes=args.nodes, max_steps=args.steps, logger=False, callbacks=callbacks,
                        enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    # batch 4 per rank, unshuffled: rank r takes sequences r, r+2, ..., so the two ranks see the
    # same 8 sequences per step as one process with batch 8 (tests/test_fsdp.py's reference)
    data = sequences(n=24, batch=4)  # 3 steps per epoch
    sampler = DistributedSampler(data.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                 shuffle=False)
    trainer.fit(module, DataLoader(data.dataset, batch_size=4, sampler=sampler), ckpt_path=args.resume)
    rank = trainer.global_rank
    module.eval()
    with torch.no_grad():
        logits = module(PROBE).float()
    frozen = [p for p in module.parameters() if not p.requires_grad]
    held = sum(_local(p).numel() * p.element_size() for p in frozen)
    whole = sum(p.numel() * p.element_size() for p in frozen)
    with gathered_adapters(module):
        adapters = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapters, str(out / f"adapters_rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "losses": module.losses, "held_bytes": held, "base_bytes": whole, "world_size": trainer.world_size,
        "logits": logits.tolist(), "sharded": any(hasattr(p, "full_tensor") for p in module.parameters())}))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


if __name__ == "__main__":
    main()
