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


def test_dpo_module_with_the_callbacks(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_peft.callbacks import AdapterCheckpoint, MergeAdapters, PagedOptimizer

    dpo = runpy.run_path(str(EXAMPLES / "dpo.py"))
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    loader = DataLoader(dpo["preference_pairs"](16, 64, seed=1), batch_size=8, collate_fn=PreferenceCollator())
    merge = MergeAdapters(output_dir=tmp_path / "merged", probe_batch={"input_ids": torch.randint(0, 64, (2, 8))})
    class StepMargins(L.Callback):
        def __init__(self):
            self.margins = []

        def on_train_batch_end(self, trainer, *args):
            self.margins.append((trainer.current_epoch, trainer.callback_metrics["train/margin"].item()))

    steps = StepMargins()
    trainer = L.Trainer(strategy="qlora", accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        callbacks=[AdapterCheckpoint(dirpath=tmp_path / "adapters"), PagedOptimizer(), merge, steps])
    trainer.fit(DPOModule(model, lr=1e-3), loader)
    # train/margin per step, train/margin_epoch the mean of the last epoch's steps (2 equal batches)
    last = [m for epoch, m in steps.margins if epoch == 1]
    assert len(last) == 2 and trainer.callback_metrics["train/margin_epoch"].item() == pytest.approx(sum(last) / 2)
    assert (tmp_path / "adapters" / "last" / "adapter_model.safetensors").is_file()
    assert type(trainer.optimizers[0]).__name__ == "PagedAdamW8bit"
    assert merge.errors["rel"] <= 1e-2


@pytest.mark.parametrize("disable", [True, False])
def test_alignment_modules_turn_dropout_off_unless_told_not_to(disable, recwarn):
    """TRL's preference trainers disable dropout by default: a policy forward with dropout against
    sampling / reference forwards without it makes the log-probability ratios noisy. With
    disable_dropout=False a model left in eval mode trains without its dropout, and the strategy
    says so."""
    import lightning as L
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_peft.methods.lora import AdapterDropout

    dpo = runpy.run_path(str(EXAMPLES / "dpo.py"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    model.model.layers[0].mlp.dropout = torch.nn.Dropout(0.1)  # a module-level dropout of the base as well
    loader = DataLoader(dpo["preference_pairs"](8, 64, seed=1), batch_size=8, collate_fn=PreferenceCollator())
    L.Trainer(strategy="qlora", accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False).fit(
        DPOModule(model, disable_dropout=disable), loader)
    dropouts = [m for m in model.modules() if isinstance(m, (torch.nn.Dropout, AdapterDropout))]
    assert len(dropouts) == 8  # 7 LoRA layers (lora_dropout 0.05) and the base's one
    assert all(m.p == 0 for m in dropouts) == disable
    reported = [w for w in recwarn if "adapter dropout modules" in str(w.message)]
    assert bool(reported) == (not disable)
