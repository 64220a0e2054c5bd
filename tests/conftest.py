"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*kernels.*")

# The test models are tiny: one thread is as fast and does not fight the other core (CI has two).
torch.set_num_threads(1)

# scripts/gpu_check.sh sets LP_TEST_DEVICE=cuda to run the model tests (4-bit ones above all) on a GPU
DEVICE = torch.device(os.environ.get("LP_TEST_DEVICE", "cpu"))


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval().to(DEVICE)


def tiny_gpt2(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=64,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval().to(DEVICE)


def token_batch(vocab: int = 128, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def train_steps(model, steps: int, lr: float, seq: int = 12) -> list[float]:
    """Adam steps on next-token loss over one fixed batch (4 rows, seed 7) in train mode, then
    back to eval mode; moves every trainable tensor away from its initial value. The losses."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = token_batch(seed=7, batch=4, seq=seq)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def realistic_adapter(model, name="default", size=0.05, seed=0):
    """Give adapter ``name`` random B with ||s B A|| = size * ||W|| in every layer (a trained
    adapter's typical few percent; B = 0 at init would make it invisible) and perturb DoRA
    magnitudes by up to 10%."""
    from lightning_peft.methods import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and name in module.scaling and module.kind != "embedding":
                B = module.lora_B[name].weight
                B.copy_(torch.randn(B.shape, generator=generator))
                B.mul_(size * module.base_weight().float().norm() / module.delta_weight(name).norm())
                if name in module.lora_magnitude_vector:
                    m = module.lora_magnitude_vector[name]
                    m.mul_(1 + 0.1 * torch.rand(m.shape, generator=generator))
    return model


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()
