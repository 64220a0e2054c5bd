"""Only adapters train; merging is exact in fp32; disable_adapters gives the base model exactly."""

from __future__ import annotations

import pytest
import torch

import lightning_peft as lp
from conftest import max_abs, realistic_adapter, rel_err, tiny_gpt2, tiny_llama, token_batch
from lightning_peft.methods import AdapterModule, LoraLayer


def _adapter_param_names(model):
    return {n for n, _ in model.named_parameters()
            if ".lora_" in n or ".modules_to_save." in n}


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_changes_only_adapter_tensors(use_dora):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lp.inject_adapters(model, lp.LoraConfig(r=4, use_dora=use_dora, modules_to_save=["lm_head"]))

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _adapter_param_names(model) and trainable
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = token_batch(batch=4, seq=16)
    model.train()
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    after = model.state_dict()
    for key, value in before.items():  # every base tensor, under its wrapped name, bit for bit
        wrapped = key.replace(".lm_head.", ".lm_head.original_module.")
        wrapped = key if key in after else key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
        if key.startswith("lm_head."):
            wrapped = "lm_head.original_module." + key.split(".", 1)[1]
        assert torch.equal(after[wrapped], value), f"base tensor {key} changed"
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, snapshot[n])]
    assert set(changed) == trainable, f"adapter tensors that did not train: {trainable - set(changed)}"


def _random_adapter(model, config, name="default"):
    lp.inject_adapters(model, config, adapter_name=name)
    return realistic_adapter(model, name).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2_conv1d"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_is_exact_and_unmerge_restores(build, use_dora):
    model = build()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = token_batch()
    with torch.no_grad():
        base_logits = model(x).logits
    _random_adapter(model, lp.LoraConfig(r=4, use_dora=use_dora, lora_dropout=0.1,
                                         target_modules="all-linear"))
    with torch.no_grad():
        two_path = model(x).logits
        assert rel_err(two_path, base_logits) > 1e-3  # the adapter matters
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        per_layer_in = {id(m): torch.randn(3, m.in_features, dtype=torch.float32) for m in layers}
        per_layer_two_path = {id(m): m(per_layer_in[id(m)]) for m in layers}

        lp.merge_adapters(model)
        assert all(m.merged == ["default"] for m in layers)
        for m in layers:  # layer by layer: the merged base alone == the two-path layer
            assert rel_err(m(per_layer_in[id(m)]), per_layer_two_path[id(m)]) <= 1e-6
        # through the whole network fp32 reassociation (W x + s B A x vs (W + s B A) x) compounds
        # over layers, attention and softmax to a few 1e-6; the per-layer check above is the 1e-6 one
        assert rel_err(model(x).logits, two_path) <= 1e-5

        lp.unmerge_adapters(model)
        assert all(m.merged == [] for m in layers)
        for name, param in model.named_parameters():
            original = name.replace(".base_layer.", ".")
            if original in base_weights:
                assert rel_err(param, base_weights[original]) <= 1e-6, name
        assert rel_err(model(x).logits, two_path) <= 1e-5


def test_merged_adapters_refuse_switching_and_disabling():
    model = _random_adapter(tiny_llama(), lp.LoraConfig(r=4))
    lp.merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge_adapters"):
        with lp.disable_adapters(model):
            pass
    with pytest.raises(RuntimeError, match="unmerge_adapters"):
        lp.set_adapter(model, "default")


def test_disable_adapters_gives_base_logits_exactly_also_for_second_adapter():
    x = token_batch()
    model = tiny_llama()
    with torch.no_grad():
        base = model(x).logits
    _random_adapter(model, lp.LoraConfig(r=4), "first")
    _random_adapter(model, lp.LoraConfig(r=8, use_dora=True,
                                         target_modules=["q_proj", "o_proj", "up_proj"]), "second")
    assert lp.adapter_configs(model).keys() == {"first", "second"}
    with torch.no_grad():
        second = model(x).logits  # inject makes the newest adapter active
        lp.set_adapter(model, "first")
        first = model(x).logits
        assert max_abs(first, base) > 1e-3 and max_abs(second, base) > 1e-3 and max_abs(first, second) > 1e-3
        for active in ("first", "second"):
            lp.set_adapter(model, active)
            with lp.disable_adapters(model):
                assert torch.equal(model(x).logits, base)
        assert torch.equal(model(x).logits, second)  # state restored on exit


def test_disable_adapters_restores_state_on_exception():
    model = _random_adapter(tiny_llama(), lp.LoraConfig(r=4))
    with pytest.raises(KeyError):
        with lp.disable_adapters(model):
            assert all(m.disabled for m in model.modules() if isinstance(m, AdapterModule))
            raise KeyError("boom")
    assert not any(m.disabled for m in model.modules() if isinstance(m, AdapterModule))


def test_set_adapter_trains_only_the_active_adapter():
    model = tiny_llama()
    lp.inject_adapters(model, lp.LoraConfig(r=4), "a")
    lp.inject_adapters(model, lp.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".b." in n or n.endswith(".b") for n in names)
    lp.set_adapter(model, "a")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".a." in n for n in names)
    with pytest.raises(ValueError, match="has \\['a', 'b'\\]"):
        lp.set_adapter(model, "c")
    model.lm_head.weight.requires_grad_(True)  # set by hand: set_adapter freezes it again
    lp.set_adapter(model, "b", trainable=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(m.active_adapter == "b" for m in model.modules() if isinstance(m, AdapterModule))


def test_adapter_modules_lists_every_adapter_module_in_named_modules_order():
    """The walk skips adapters' own stores (lora_A, ...) but not modules_to_save copies, which hold
    the LoRA layers of the copied block: switching adapters must reach those too."""
    from lightning_peft.inject import adapter_modules

    model = tiny_llama()
    lp.inject_adapters(model, lp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["layers.0"]), "a")
    lp.inject_adapters(model, lp.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    lp.inject_adapters(model, lp.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), "c")
    expected = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterModule)]
    found = list(adapter_modules(model))
    assert [n for n, _ in found] == [n for n, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(found, expected))
    inside_copy = [m for n, m in found if ".modules_to_save.a." in n]
    assert inside_copy
    lp.set_adapter(model, "b")
    assert all(m.active_adapter == "b" for m in inside_copy)


def test_delete_adapter_restores_original_modules():
    model = tiny_llama()
    linear_type = type(model.model.layers[0].self_attn.q_proj)
    lp.inject_adapters(model, lp.LoraConfig(r=4, modules_to_save=["lm_head"]))
    lp.delete_adapter(model, "default")
    assert type(model.model.layers[0].self_attn.q_proj) is linear_type
    assert not any(isinstance(m, AdapterModule) for m in model.modules())
    assert lp.adapter_configs(model) == {}
