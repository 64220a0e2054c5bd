"""AdapterCheckpoint and MergeAdapters (PagedOptimizer has its own file)."""

from __future__ import annotations

import json
import os

import lightning as L
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_peft as lp
from lightning_peft.callbacks import AdapterCheckpoint, MergeAdapters
from plain_module import CausalLM, sequences


def _trainer(strategy, callbacks, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(strategy=strategy, callbacks=callbacks, **{**defaults, **kwargs})


class ScheduledLM(CausalLM):
    """Cosine LR schedule stepped every batch: resume must restore it too."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=40)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        self.lrs = getattr(self, "lrs", []) + [self.trainer.optimizers[0].param_groups[0]["lr"]]
        return super().training_step(batch, batch_idx)


class SelfInjectedLM(CausalLM):
    """A module that injects its own adapters (no lightning-peft strategy)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        lp.inject_adapters(self.model, lp.LoraConfig(r=4, lora_dropout=0.0))


def test_adapter_checkpoint_directory_loads_in_peft_with_same_logits(tmp_path):
    module = CausalLM()
    checkpoint = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)
    _trainer(lp.PEFTStrategy(peft_config=lp.LoraConfig(r=8)), [checkpoint], max_steps=6).fit(module, sequences())
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0-step=6", "last"]  # top-1 by recency; the step-3 save was pruned
    directory = tmp_path / "ckpt" / "last"
    assert {p.name for p in directory.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                      "lightning_peft_checksums.json", "training_state.ckpt", "README.md"}
    card = (directory / "README.md").read_text()  # the model card knows the fit: data, steps, metrics
    assert "- optimizer steps: 6" in card and "- training examples: " in card and "| train_loss |" in card
    assert checkpoint.best_adapter_path.endswith("epoch=0-step=6")
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ours = module.eval().model(x).logits
        base = CausalLM().model.eval()(x).logits
        theirs = peft.PeftModel.from_pretrained(CausalLM().model, directory).eval()(x).logits
    assert (ours - base).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-5
    state = torch.load(directory / "training_state.ckpt", weights_only=True)
    assert state["state_dict"] and all(".lora_" in k for k in state["state_dict"])


@pytest.mark.parametrize("strategy", ["lora", "auto"])
def test_resume_from_adapter_directory_matches_uninterrupted_run(strategy, tmp_path):
    build = ScheduledLM if strategy == "lora" else (lambda: SelfInjectedLM())
    if strategy == "auto":
        build = lambda: type("Scheduled", (SelfInjectedLM, ScheduledLM), {})()  # noqa: E731
    L.seed_everything(0)
    straight = build()
    _trainer(strategy, [], max_epochs=2, enable_checkpointing=False).fit(straight, sequences())

    L.seed_everything(0)
    first = build()
    _trainer(strategy, [AdapterCheckpoint(dirpath=tmp_path)], max_epochs=1).fit(first, sequences())
    assert (tmp_path / "last" / "training_state.ckpt").is_file()

    L.seed_everything(0)
    resumed = build()
    _trainer(strategy, [AdapterCheckpoint(dirpath=tmp_path / "again")], max_epochs=2).fit(
        resumed, sequences(), ckpt_path=tmp_path / "last")
    assert len(resumed.losses) == 10
    assert resumed.lrs == straight.lrs[10:]  # the LR schedule continues where it was
    assert max(abs(a - b) for a, b in zip(resumed.losses, straight.losses[10:])) <= 1e-6


def test_crash_during_second_save_leaves_first_loadable_and_resumable(tmp_path, monkeypatch):
    from lightning_peft.callbacks import adapter_checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def crash_on_second_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as handle:  # half a file, then the disk is full
                handle.write(b"\x00" * 64)
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(adapter_checkpoint.torch, "save", crash_on_second_save)
    checkpoint = AdapterCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, save_last=False)
    with pytest.raises(OSError, match="No space left"):
        _trainer("lora", [checkpoint], max_steps=6).fit(CausalLM(), sequences())
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=2"]  # no temp dir, no half save
    resumed = CausalLM()
    _trainer("lora", [], max_steps=4, enable_checkpointing=False).fit(resumed, sequences(),
                                                                       ckpt_path=tmp_path / "epoch=0-step=2")
    assert len(resumed.losses) == 2


def test_adapter_checkpoint_without_adapters_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="strategy='qlora'"):
        _trainer("auto", [AdapterCheckpoint(dirpath=tmp_path)], max_steps=1).fit(CausalLM(), sequences())


def test_merge_adapters_on_qlora_exports_a_verified_plain_model(tmp_path):
    module = CausalLM()
    merge = MergeAdapters(output_dir=tmp_path / "merged")
    _trainer("qlora", [merge], max_steps=8, enable_checkpointing=False).fit(module, sequences(n=8))
    assert merge.errors["rel"] <= 1e-2
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    plain = CausalLM(seed=5).model  # the plain transformers model, no lightning_peft involved
    plain.load_state_dict(weights, strict=True)
    x = next(iter(sequences(n=8)))
    with torch.no_grad():
        adapted = module.eval().model(x).logits.float()
        exported = plain.eval()(x).logits
    assert ((exported - adapted).norm() / adapted.norm()).item() <= 1e-2
    manifest = json.loads((tmp_path / "merged" / "lightning_peft_export.json").read_text())
    assert manifest["quantized_base"]["quant_type"] == "nf4" and manifest["adapter"] == "default"


def test_merge_adapters_detects_a_corrupted_export(tmp_path, monkeypatch):
    from lightning_peft.callbacks import merge_adapters

    real_export = merge_adapters.export_merged

    def export_then_corrupt(*args, **kwargs):
        path = real_export(*args, **kwargs)
        weights = load_file(path)
        key = "model.layers.0.self_attn.q_proj.weight"
        weights[key] = weights[key] * 3  # a planted corruption
        save_file(weights, str(path))
        return path

    monkeypatch.setattr(merge_adapters, "export_merged", export_then_corrupt)
    with pytest.raises(RuntimeError, match="does not reproduce the adapted model.*do not ship it"):
        _trainer("lora", [MergeAdapters(output_dir=tmp_path, dtype=torch.float32)], max_steps=2,
                 enable_checkpointing=False).fit(CausalLM(), sequences(n=8))


@pytest.mark.parametrize("strategy", ["dora", "auto"])
def test_merge_adapters_fp32_export_is_exact_for_a_float_base(strategy, tmp_path):
    """With a strategy, and with adapters the module injected itself under Lightning's default."""
    merge = MergeAdapters(output_dir=tmp_path, dtype=torch.float32)
    module = CausalLM() if strategy == "dora" else SelfInjectedLM()
    _trainer(strategy, [merge], max_steps=3, enable_checkpointing=False).fit(module, sequences(n=8))
    assert merge.errors["rel"] <= 1e-5
    weights = load_file(tmp_path / "model.safetensors")
    assert set(weights) == set(CausalLM().model.state_dict())  # the plain model's keys, nothing else
