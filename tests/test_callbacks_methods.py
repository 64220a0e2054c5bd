"""The callbacks with every adapter method, not only LoRA.

- MergeAdapters: (IA)^3 and BitFit runs export a merged model that the plain transformers model
  loads strictly and that computes the adapted model's logits; prompt, prefix and bottleneck
  adapters (which cannot be merged) are refused at fit start, before any training step.
- OverfittingGuard: the restore puts back the tensors that train. For a prefix behind its
  reparameterising MLP the saved prefix is computed, so writing into it would be lost; after the
  restore the model's output must equal its output at the best evaluation (LoRA too).
- ForgettingProbe scores the real tokens under prompt tuning (its logits include the virtual ones).
- RankMonitor, which measures LoRA ranks, refuses other methods at fit start.
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import lightning_peft as lp
from lightning_peft.callbacks import MergeAdapters, OverfittingGuard, RankMonitor
from lightning_peft.callbacks.forgetting_probe import ForgettingProbe, causal_lm_token_losses
from lightning_peft.checkpoint import adapter_tensors
from plain_module import CausalLM, sequences


def _trainer(callbacks, strategy="auto", **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(strategy=strategy, callbacks=list(callbacks), **{**defaults, **kwargs})


PROBE = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------- MergeAdapters
@pytest.mark.parametrize("config", [lp.IA3Config(), lp.BitFitConfig()], ids=["ia3", "bitfit"])
def test_merge_adapters_exports_and_verifies_ia3_and_bitfit(config, tmp_path):
    module = CausalLM()
    merge = MergeAdapters(output_dir=tmp_path, dtype=torch.float32)
    _trainer([merge], lp.PEFTStrategy(peft_config=config), max_steps=4).fit(module, sequences(n=32))
    assert merge.errors["rel"] <= 1e-5, merge.errors

    # the file, in the plain transformers model (BitFit gave the bias-free Llama layers a bias)
    plain_config = copy.deepcopy(module.model.config)
    plain_config.attention_bias = plain_config.mlp_bias = isinstance(config, lp.BitFitConfig)
    plain = LlamaForCausalLM(plain_config).eval()
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    model = module.model.eval()
    with torch.no_grad():
        adapted = model(PROBE).logits
        with lp.disable_adapters(model):
            base = model(PROBE).logits
        exported = plain(PROBE).logits
    assert rel_err(exported, adapted) <= 1e-5
    assert rel_err(adapted, base) > 1e-3  # the adapter trained: the comparison is not vacuous


@pytest.mark.parametrize("config, method", [
    (lp.BottleneckConfig(), "bottleneck"),
    (lp.PromptTuningConfig(num_virtual_tokens=4), "prompt"),
    (lp.PrefixTuningConfig(num_virtual_tokens=4, projection=True), "prefix"),
], ids=["bottleneck", "prompt", "prefix"])
def test_merge_adapters_refuses_unmergeable_methods_at_fit_start(config, method, tmp_path):
    module = CausalLM()
    with pytest.raises(RuntimeError) as err:
        _trainer([MergeAdapters(output_dir=tmp_path / "merged")], lp.PEFTStrategy(peft_config=config),
                 max_steps=4).fit(module, sequences(n=32))
    message = str(err.value)
    assert f"a {method} adapter" in message and "cannot be folded" in message
    assert "AdapterCheckpoint" in message and "save_adapter" in message  # what to do instead
    assert module.losses == []  # refused before the first training step
    assert not (tmp_path / "merged").exists()


def test_merge_adapters_unknown_adapter_name_at_fit_start(tmp_path):
    module = CausalLM()
    with pytest.raises(ValueError, match="no adapter 'other'.*'default'"):
        _trainer([MergeAdapters(output_dir=tmp_path, adapter_name="other")], "lora", max_steps=4).fit(
            module, sequences(n=32))
    assert module.losses == []


class LoraAndPrompt(CausalLM):
    """LoRA "default" (trained, merged) beside an inactive prompt-tuning adapter "p"."""

    def __init__(self):
        super().__init__()
        lp.inject_adapters(self.model, lp.LoraConfig(r=4, lora_dropout=0.0))
        lp.inject_adapters(self.model, lp.PromptTuningConfig(num_virtual_tokens=4), adapter_name="p")
        lp.set_adapter(self.model, "default")


def test_merge_adapters_verifies_beside_a_model_level_adapter(tmp_path):
    """The plain copy drops the prompt module (it wraps nothing) and leaves the live model's alone."""
    module = LoraAndPrompt()
    merge = MergeAdapters(output_dir=tmp_path, dtype=torch.float32)
    _trainer([merge], max_steps=3).fit(module, sequences(n=32))
    assert merge.errors["rel"] <= 1e-5, merge.errors
    plain = CausalLM(seed=5).model.eval()
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    model = module.model.eval()
    with torch.no_grad():
        assert rel_err(plain(PROBE).logits, model(PROBE).logits) <= 1e-5
        with lp.use_adapter(model, "p"):  # the live prompt adapter still prepends its 4 tokens
            assert model(PROBE).logits.shape[1] == 4 + PROBE.shape[1]


# ------------------------------------------------------------------------------- OverfittingGuard
class ScriptedValidation(CausalLM):
    """Real training; the validation loss is scripted, lowest at epoch 2, then rising, so that the
    guard (patience 2, no train_monitor) stops at epoch 4 and restores epoch 2. The logits on a
    fixed probe are recorded at each validation, when the guard takes its copy."""

    SCRIPT = [3.0, 2.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]

    def __init__(self, config):
        super().__init__(lr=3e-2)
        lp.inject_adapters(self.model, config)
        self.probe_logits: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.SCRIPT[self.current_epoch])

    def on_validation_epoch_end(self):
        with torch.no_grad():
            self.probe_logits.append(self.model(input_ids=PROBE).logits.clone())


@pytest.mark.parametrize("config", [lp.LoraConfig(r=4, lora_dropout=0.0),
                                    lp.PrefixTuningConfig(num_virtual_tokens=4, projection=True)],
                         ids=["lora", "prefix_projection"])
def test_overfitting_guard_restores_the_output_of_the_best_epoch(config):
    L.seed_everything(0)
    module, guard = ScriptedValidation(config), OverfittingGuard(train_monitor=None, patience=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([guard], max_epochs=len(ScriptedValidation.SCRIPT)).fit(module, sequences(n=16), sequences(n=8))
    assert (guard.best_epoch, guard.stopped_epoch, guard.restored) == (2, 4, True)
    best, last = module.probe_logits[2], module.probe_logits[4]
    assert rel_err(last, best) > 1e-3  # training moved the adapter after the best epoch
    with torch.no_grad():
        restored = module.model.eval()(input_ids=PROBE).logits
    assert torch.allclose(restored, best, rtol=0, atol=1e-6), (restored - best).abs().max()

    copied = guard.state_dict()["best_adapters"]["default"]
    if isinstance(config, lp.PrefixTuningConfig):  # the embedding and the MLP train, not the prefix
        assert any(".prefix_mlp." in key for key in copied) and any(".prefix_embeddings." in key for key in copied)


def test_overfitting_guard_resumes_a_copy_keyed_by_file_names():
    """A checkpoint written before the guard copied the training tensors holds the adapter-file
    keys; resuming from it still restores (LoRA: the same tensors)."""
    module = ScriptedValidation(lp.LoraConfig(r=4, lora_dropout=0.0))
    with torch.no_grad():
        for tensor in adapter_tensors(module, "default").values():
            tensor.normal_()
    best = {key: t.detach().clone() for key, t in adapter_tensors(module, "default").items()}
    guard = OverfittingGuard(train_monitor=None)
    state = guard.state_dict()
    state.pop("keys")
    guard.load_state_dict({**state, "best_adapters": {"default": best}, "stopped_epoch": 3})
    with torch.no_grad():
        for tensor in adapter_tensors(module, "default").values():
            tensor.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard.on_train_end(None, module)
    assert all(torch.equal(adapter_tensors(module, "default")[key], t) for key, t in best.items())


# ------------------------------------------------------------------------------- ForgettingProbe
def test_forgetting_probe_scores_the_real_tokens_under_prompt_tuning():
    tokens = 4
    module = CausalLM()
    lp.inject_adapters(module.model, lp.PromptTuningConfig(num_virtual_tokens=tokens))
    model = module.model.eval()
    with torch.no_grad():
        losses = causal_lm_token_losses(module, PROBE)
        logits = model(input_ids=PROBE).logits  # [B, T + 12, V]: the virtual positions come first
        assert logits.shape[1] == tokens + PROBE.shape[1]
        expected = F.cross_entropy(logits[:, tokens:-1].reshape(-1, logits.shape[-1]), PROBE[:, 1:].reshape(-1),
                                   reduction="none")
        with lp.disable_adapters(model):  # the same tokens scored for the base: the model's own loss
            base = causal_lm_token_losses(module, PROBE).mean()
            own = model(input_ids=PROBE, labels=PROBE).loss
    assert losses.shape == (2 * 11,) and torch.allclose(losses, expected, rtol=1e-6, atol=1e-6)
    assert abs(base.item() - own.item()) <= 1e-5

    probe = ForgettingProbe([PROBE], max_regression=10.0)
    _trainer([probe], lp.PEFTStrategy(peft_config=lp.PromptTuningConfig(num_virtual_tokens=tokens)),
             max_steps=2, limit_val_batches=1).fit(CausalLM(), sequences(n=16), sequences(n=8))
    assert probe.base_loss > 0 and len(probe.history) >= 1


# ----------------------------------------------------------------------------------- RankMonitor
def test_rank_monitor_refuses_other_methods_at_fit_start():
    module = CausalLM()
    with pytest.raises(RuntimeError, match=r"LoRA.*'default' is \(IA\)\^3.*remove RankMonitor") as err:
        _trainer([RankMonitor(every_n_steps=50)], lp.PEFTStrategy(peft_config=lp.IA3Config()),
                 max_steps=4).fit(module, sequences(n=32))
    assert module.losses == [], str(err.value)
