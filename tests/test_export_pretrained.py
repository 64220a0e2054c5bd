"""Merged exports are ``from_pretrained`` directories (config, generation config, tokenizer files,
sharded weights with an index), and adapter / merged directories carry a model card."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lightning_peft as lp
from conftest import realistic_adapter, rel_err, tiny_llama, token_batch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tokenizer(vocab: int = 128):
    """A word-level tokenizer built locally with the ``tokenizers`` package (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved with ``save_pretrained`` and a tokenizer beside it (a local base model)."""
    path = tmp_path_factory.mktemp("base") / "llama"
    tiny_llama(seed=3).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _adapted(base_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    lp.inject_adapters(model, lp.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    realistic_adapter(model, size=0.05)
    return model


def test_merged_export_loads_with_from_pretrained_and_matches_the_adapted_model(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _adapted(base_dir)
    out = tmp_path / "merged"
    weights = lp.export_merged(model, out, dtype=torch.float32)  # base found through model.name_or_path
    assert weights == out / "model.safetensors"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "lightning_peft_export.json"} <= names
    assert not any(n.startswith(".") for n in names)  # no staging leftovers
    with safe_open(str(weights), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in loaded.state_dict())
    batch = token_batch()
    with torch.no_grad():
        expected, got = model(batch).logits, loaded(batch).logits
    assert rel_err(got, expected) < 1e-5
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2 w7")["input_ids"] == [4, 5, 10]

    card = (out / "README.md").read_text()
    assert "base_model:" in card and "LoRA" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert '"r": 4' in card


def test_sharded_export_writes_an_index_and_loads(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _adapted(base_dir)
    out = tmp_path / "sharded"
    path = lp.export_merged(model, out, dtype=torch.float32, max_shard_size="40KB", tokenizer=_tokenizer())
    assert path == out / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    sizes = []
    for name in shards:
        with safe_open(str(out / name), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            sizes.append(sum(handle.get_tensor(k).numel() * 4 for k in handle.keys()))
    assert sum(sizes) == index["metadata"]["total_size"]
    assert all(size <= 40_000 for size in sizes[:-1]) or max(sizes) > 40_000  # one tensor alone may exceed
    assert (out / "tokenizer.json").is_file()  # from the tokenizer object

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = token_batch()
    with torch.no_grad():
        assert rel_err(loaded(batch).logits, model(batch).logits) < 1e-5

    # an unsharded export over it leaves no stale shards or index behind
    lp.export_merged(model, out, dtype=torch.float32)
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").is_file()


def test_bad_shard_size_and_base_are_errors(base_dir, tmp_path):
    model = _adapted(base_dir)
    with pytest.raises(ValueError, match="max_shard_size"):
        lp.export_merged(model, tmp_path / "a", max_shard_size="lots")
    with pytest.raises(ValueError, match="not a directory"):
        lp.export_merged(model, tmp_path / "b", base=tmp_path / "missing")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))


def test_plain_module_export_takes_config_from_the_base_directory(base_dir, tmp_path):
    """A model that is not a transformers model: config.json comes from ``base``."""
    model = _adapted(base_dir)
    model.config = None  # as a plain nn.Module has none
    out = tmp_path / "plain"
    lp.export_merged(model, out, dtype=torch.float32, base=base_dir)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()


def test_adapter_directory_has_a_model_card(base_dir, tmp_path):
    model = _adapted(base_dir)
    lp.save_adapter(model, tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    report = lp.adapter_report(model, show=False)
    assert f"{report.trainable_params:,} trainable" in card
    assert "PeftModel.from_pretrained" in card and "--enable-lora" in card and "--lora-modules default=" in card
    assert str(base_dir) in card
    lp.save_adapter(model, tmp_path / "bare", model_card=False)
    assert not (tmp_path / "bare" / "README.md").exists()
