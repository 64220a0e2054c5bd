"""HF PEFT as the oracle for (IA)^3, prompt tuning and prefix tuning: our adapter files load into
PEFT, and PEFT's into ours, with the same logits (max abs diff <= 1e-5, fp32) on tiny transformers
models (Llama with grouped-query attention; GPT-2 with Conv1D layers)."""

from __future__ import annotations

import peft
import pytest
import torch

import lightning_peft as lp
from conftest import max_abs, tiny_gpt2, tiny_llama, token_batch, train_steps

TOL = 1e-5

CASES = {  # name: (model builder, our config, PEFT's config)
    "ia3_llama": (tiny_llama, lambda: lp.IA3Config(),
                  lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])),
    "ia3_gpt2_conv1d": (tiny_gpt2, lambda: lp.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                        feedforward_modules=["mlp.c_proj"]),
                        lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                                               feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
    "prompt_llama": (tiny_llama, lambda: lp.PromptTuningConfig(num_virtual_tokens=5),
                     lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)),
    "prefix_llama_gqa": (tiny_llama, lambda: lp.PrefixTuningConfig(num_virtual_tokens=6),
                         lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)),
    "prefix_llama_projection": (tiny_llama, lambda: lp.PrefixTuningConfig(num_virtual_tokens=6, projection=True,
                                                                          encoder_hidden_size=24),
                                lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                                prefix_projection=True, encoder_hidden_size=24)),
    "prefix_gpt2": (tiny_gpt2, lambda: lp.PrefixTuningConfig(num_virtual_tokens=4),
                    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
}


def _inputs(ours: bool = False):
    """Two rows, the second left-padded: the virtual tokens' mask entries matter.

    PEFT counts the pads in the positions (its default positions); ours, given none, takes them
    from the mask and skips the pads (a padded row then equals the row alone, docs/methods.md).
    Ours is handed PEFT's positions, ``0 .. 9`` for both rows, so the two compute one function."""
    ids = token_batch(seq=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if ours:
        inputs["position_ids"] = torch.arange(10).expand(2, -1)
    return inputs


def _train_a_few_steps(model: torch.nn.Module, steps: int = 3) -> None:
    train_steps(model, steps, lr=5e-2)


def _logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or _inputs(ours=not isinstance(model, peft.PeftModel)))).logits


@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    build, ours_config, _ = CASES[case]
    torch.manual_seed(3)
    model = lp.inject_adapters(build(), ours_config())
    _train_a_few_steps(model)
    ours, base = _logits(model), _logits(build())
    lp.save_adapter(model, tmp_path)

    theirs = _logits(peft.PeftModel.from_pretrained(build(), tmp_path).eval())
    assert ours.shape == theirs.shape  # prompt tuning: the virtual positions are in both
    if ours.shape == base.shape:
        assert max_abs(ours, base) > 1e-3, "the trained adapter must change the output for this test to mean anything"
    assert max_abs(ours, theirs) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_ours_with_same_logits(case, tmp_path):
    build, _, peft_config = CASES[case]
    torch.manual_seed(3)
    theirs_model = peft.get_peft_model(build(), peft_config())
    _train_a_few_steps(theirs_model)
    theirs = _logits(theirs_model)
    theirs_model.save_pretrained(tmp_path)

    model = lp.load_adapter(build(), tmp_path)
    ours = _logits(model)
    assert ours.shape == theirs.shape
    assert max_abs(ours, theirs) <= TOL
    # and back: our re-save of PEFT's adapter holds the same tensors under the same keys
    lp.save_adapter(model, tmp_path / "again")
    from safetensors.torch import load_file
    first, second = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
