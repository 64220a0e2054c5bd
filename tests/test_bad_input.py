"""Every user-facing error names the thing and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_peft as lp
from conftest import tiny_llama
from lightning_peft.checkpoint import CHECKSUMS_NAME, CONFIG_NAME, WEIGHTS_NAME


def test_unknown_target_module_lists_closest_names():
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        lp.inject_adapters(model, lp.LoraConfig(target_modules=["q_proj", "v_prj"]))
    message = str(err.value)
    assert "'v_prj'" in message and "v_proj" in message and "Closest module names" in message
    assert not lp.adapter_configs(model)  # nothing was changed
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_target_of_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="LoRA cannot wrap.*input_layernorm"):
        lp.inject_adapters(tiny_llama(), lp.LoraConfig(target_modules=["input_layernorm"]))


def test_shape_mismatch_on_load_lists_keys_and_both_shapes(tmp_path):
    lp.save_adapter(lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4)), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["r"] = 8  # the file says r=8 but holds r=4 tensors
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        lp.load_adapter(model, tmp_path)
    message = str(err.value)
    assert "shape mismatch" in message
    assert "shape mismatch (28)" in message  # 14 layers x (A, B)
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight: file (4, 128) vs model (8, 128)" in message
    assert not lp.adapter_configs(model)  # the half-made injection was undone
    assert not any(isinstance(m, lp.methods.AdapterModule) for m in model.modules())


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    lp.save_adapter(lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4)), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_C.weight"] = tensors.pop(key)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    (tmp_path / CHECKSUMS_NAME).unlink()  # an edited file, as a PEFT directory (no checksums) could hold
    with pytest.raises(ValueError) as err:
        lp.load_adapter(tiny_llama(), tmp_path)
    assert f"missing from the file (1): {key}" in str(err.value)
    assert "in the file but not in the model (1): base_model.model.model.layers.1.mlp.up_proj.lora_C.weight" in str(err.value)


def test_truncated_safetensors_names_the_file(tmp_path):
    lp.save_adapter(lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4)), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        lp.load_adapter(tiny_llama(), tmp_path)
    assert str(weights) in str(err.value) and "truncated or corrupt" in str(err.value)


def test_pickled_bin_adapter_is_refused_with_the_reason(tmp_path):
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, init_lora_weights=False)).eval()
    lp.save_adapter(model, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    torch.save(load_file(weights), tmp_path / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(ValueError) as err:
        lp.load_adapter(tiny_llama(), tmp_path)
    message = str(err.value)
    assert "adapter_model.bin" in message and "safetensors only" in message and "arbitrary code" in message
    # the explicit opt-in reads it with torch.load(weights_only=True)
    loaded = lp.load_adapter(tiny_llama(), tmp_path, allow_pickle=True).eval()
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lp.load_adapter(tiny_llama(), tmp_path)


def test_unknown_config_fields_load_with_a_warning(tmp_path):
    lp.save_adapter(lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4)), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["future_knob"] = 3
    config["layers_pattern"] = None  # PEFT writes many null fields: those stay silent
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="future_knob"):
        lp.load_adapter(tiny_llama(), tmp_path)


def test_duplicate_adapter_name_is_refused():
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lp.inject_adapters(model, lp.LoraConfig(r=4))


def test_crash_mid_save_leaves_previous_adapter_loadable(tmp_path, monkeypatch):
    first = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, init_lora_weights=False)).eval()
    lp.save_adapter(first, tmp_path)
    second = lp.inject_adapters(tiny_llama(seed=3), lp.LoraConfig(r=4, init_lora_weights=False))

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # half a file, then the process "dies"
            handle.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr("lightning_peft.checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        lp.save_adapter(second, tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME, CHECKSUMS_NAME]  # no temp litter
    reloaded = lp.load_adapter(tiny_llama(), tmp_path).eval()
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, first(x).logits)
