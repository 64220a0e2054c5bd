"""HF PEFT as the oracle: our adapter files load into PEFT, and PEFT's into ours, with the same
logits (max abs diff <= 1e-5, fp32), for LoRA, rsLoRA, DoRA, rank/alpha patterns, modules_to_save,
GPT-2 Conv1D layers and embeddings."""

from __future__ import annotations

import peft
import pytest
import torch

import lightning_peft as lp
from conftest import max_abs, tiny_gpt2, tiny_llama, token_batch, train_steps

TOL = 1e-5

CASES = {
    "lora": (tiny_llama, dict(r=8, lora_alpha=16)),
    "rslora": (tiny_llama, dict(r=8, lora_alpha=16, use_rslora=True)),
    "dora": (tiny_llama, dict(r=8, lora_alpha=16, use_dora=True)),
    "patterns": (tiny_llama, dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                                  alpha_pattern={"v_proj": 5, "down_proj": 40})),
    "modules_to_save": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         modules_to_save=["lm_head"])),
    "gpt2_conv1d_embedding": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"])),
    "gpt2_dora_bias": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True,
                                       bias="lora_only")),
}


def _train_a_few_steps(model: torch.nn.Module, steps: int = 4) -> None:
    train_steps(model, steps, lr=2e-2, seq=16)


@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    build, kwargs = CASES[case]
    x = token_batch()
    model = lp.inject_adapters(build(), lp.LoraConfig(lora_dropout=0.05, **kwargs))
    _train_a_few_steps(model)
    with torch.no_grad():
        ours = model(x).logits
        base = build()(x).logits
    lp.save_adapter(model, tmp_path)

    theirs_model = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        theirs = theirs_model(x).logits
    assert max_abs(ours, base) > 1e-3, "the trained adapter must change the output for this test to mean anything"
    assert max_abs(ours, theirs) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_ours_with_same_logits(case, tmp_path):
    build, kwargs = CASES[case]
    x = token_batch()
    theirs_model = peft.get_peft_model(build(), peft.LoraConfig(lora_dropout=0.05, **kwargs))
    _train_a_few_steps(theirs_model)
    with torch.no_grad():
        theirs = theirs_model(x).logits
        base = build()(x).logits
    theirs_model.save_pretrained(tmp_path)

    model = lp.load_adapter(build(), tmp_path)
    with torch.no_grad():
        ours = model(x).logits
    assert max_abs(theirs, base) > 1e-3
    assert max_abs(ours, theirs) <= TOL
    # and back out again: our re-save of PEFT's adapter is byte-for-byte the same tensors
    lp.save_adapter(model, tmp_path / "resaved")
    again = peft.PeftModel.from_pretrained(build(), tmp_path / "resaved").eval()
    with torch.no_grad():
        assert max_abs(again(x).logits, theirs) <= TOL


def test_fresh_adapter_is_an_identity_like_peft():
    """init_lora_weights=True starts from the base model's function in both libraries."""
    x = token_batch()
    with torch.no_grad():
        base = tiny_llama()(x).logits
        ours = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=8, use_dora=True)).eval()(x).logits
    assert max_abs(ours, base) <= 1e-6


def test_pissa_adapter_round_trips_onto_the_original_base(tmp_path):
    """PiSSA trains against the residual base W - U_r S_r V_r^T: loading onto the original base
    redoes that split, so the reloaded model computes what the trained one did."""
    x = token_batch()
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, init_lora_weights="pissa"))
    _train_a_few_steps(model)
    with torch.no_grad():
        trained = model(x).logits
    lp.save_adapter(model, tmp_path)
    reloaded = lp.load_adapter(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert max_abs(reloaded(x).logits, trained) <= 1e-4
