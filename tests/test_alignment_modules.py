"""DPO and GRPO end to end under strategy="qlora" (the examples, on tiny settings)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from lightning_peft.alignment import DPOModule, GRPOModule, PreferenceCollator

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_dpo_under_qlora_learns_the_preference():
    result = runpy.run_path(str(EXAMPLES / "dpo.py"))["main"](["--steps", "30"])
    assert result["before"] < 0.8  # near chance before training
    assert result["after"] >= 0.9


def test_grpo_under_qlora_raises_the_reward():
    result = runpy.run_path(str(EXAMPLES / "grpo.py"))["main"](["--steps", "30"])
    assert result["last"] - result["first"] >= 0.3, result["rewards"]


def test_preference_collator_masks_prompts_and_padding():
    batch = PreferenceCollator(pad_token_id=0)([{"prompt": [5, 6], "chosen": [7], "rejected": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 6, 8, 9]]
    assert batch["labels_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="'sigmoid', 'ipo'"):
        DPOModule(torch.nn.Linear(2, 2), loss_type="kto")
    with pytest.raises(TypeError, match="no generate"):
        GRPOModule(torch.nn.Linear(2, 2), lambda p, c: torch.zeros(len(c)))
