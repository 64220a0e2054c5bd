"""LoraConfig: invalid values raise at construction with the valid choices; files hold only set fields."""

from __future__ import annotations

import pytest

import lightning_peft as lp


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "positive int"),
    (dict(r=2.5), "positive int"),
    (dict(lora_alpha=-1), "positive number"),
    (dict(lora_dropout=1.0), r"\[0, 1\)"),
    (dict(bias="some"), r"\['none', 'all', 'lora_only'\]"),
    (dict(init_lora_weights="olora"), r"\[True, False, 'gaussian', 'pissa'\]"),
    (dict(target_modules="q_proj("), "not a valid regular expression"),
    (dict(target_modules=[]), "empty list"),
    (dict(rank_pattern={"q_proj": 0}), "positive number"),
    (dict(alpha_pattern={"q_proj": "x"}), "positive number"),
    (dict(use_dora="yes"), "True or False"),
])
def test_invalid_values_raise_with_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lp.LoraConfig(**kwargs)


def test_defaults_are_the_recipe():
    config = lp.LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (16, 32, 0.05, "all-linear")


def test_to_dict_writes_optional_fields_only_when_set():
    plain = lp.LoraConfig().to_dict()
    assert "use_dora" not in plain and "use_rslora" not in plain and "exclude_modules" not in plain
    assert plain["peft_type"] == "LORA" and plain["r"] == 16
    dora = lp.LoraConfig(use_dora=True, use_rslora=True, exclude_modules=["lm_head"]).to_dict()
    assert dora["use_dora"] is True and dora["use_rslora"] is True and dora["exclude_modules"] == ["lm_head"]
    assert lp.LoraConfig.from_dict(dora) == lp.LoraConfig(use_dora=True, use_rslora=True, exclude_modules=["lm_head"])


def test_other_peft_types_are_refused():
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        lp.LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["k_proj"]})
