"""PEFT config fields beyond the basics: ``layers_to_transform`` / ``layers_pattern``,
``lora_bias``, (IA)^3 ``modules_to_save``, ``exclude_modules`` as PEFT writes it; their errors.
(PEFT parity of each is in tests/test_peft_parity_matrix.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.methods import LoraLayer, ModulesToSave


class Stack(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4, bias=False)})
                                          for _ in range(n))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.model.layers:
            x = layer["v"](layer["q"](x))
        return self.head(x)


def _adapted(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))


def test_layers_to_transform_picks_layers_by_index():
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q", "v"], layers_to_transform=[0, 2]))
    assert _adapted(model) == ["model.layers.0.q", "model.layers.0.v", "model.layers.2.q", "model.layers.2.v"]
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], layers_to_transform=1,
                                                      layers_pattern="layers"))
    assert _adapted(model) == ["model.layers.1.q"]
    # the saved config lists what was adapted, so PEFT and we select the same modules again
    assert lp.adapter_configs(model)["default"].to_dict()["target_modules"] == ["model.layers.1.q"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_modules": ["q"], "layers_pattern": "layers"}, "needs layers_to_transform"),
    ({"target_modules": ".*q", "layers_to_transform": [0]}, "regex target_modules"),
    ({"target_modules": ["q"], "layers_to_transform": [-1]}, "ints >= 0"),
    ({"target_modules": ["q"], "lora_bias": True, "use_dora": True}, "pick one"),
])
def test_bad_layer_and_bias_fields_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lp.LoraConfig(**kwargs)


def test_layers_that_select_nothing_say_so():
    with pytest.raises(ValueError, match="no matching module sits in those layers"):
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], layers_to_transform=[7]))
    with pytest.raises(ValueError, match="no matching module sits in those layers"):
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], layers_to_transform=[0], layers_pattern="blocks"))


def test_exclude_modules_with_the_names_it_excludes_listed():
    """PEFT writes target_modules=["q", "v"] with exclude_modules=["v"]: "v" is found, then excluded."""
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q", "v"], exclude_modules=["v"]))
    assert _adapted(model) == [f"model.layers.{i}.q" for i in range(3)]
    with pytest.raises(ValueError, match="'w' matches no module"):  # a name matching nothing is still an error
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q", "w"], exclude_modules=["v"]))


def test_lora_bias_trains_merges_and_refuses_what_it_cannot_do():
    x = torch.randn(3, 4)
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q", "v"], lora_bias=True,
                                                      init_lora_weights=False, lora_dropout=0.0))
    layer = model.model.layers[0]["q"]
    assert layer.lora_B["default"].bias.requires_grad
    # "v" has no bias to fold the lora_B bias into: merging is refused before anything changes
    with pytest.raises(RuntimeError, match="without a bias to fold it into"):
        lp.merge_adapters(model)
    with pytest.raises(ValueError, match="mixed-adapter batches do not support"):
        with lp.adapter_ids(model, ["default", None, "default"]):
            model(x)
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], lora_bias=True, init_lora_weights=False,
                                                      lora_dropout=0.0))
    with torch.no_grad():
        model.model.layers[1]["q"].lora_B["default"].bias.fill_(0.5)  # the bias alone changes the output
        before = model(x)
        lp.merge_adapters(model)
        torch.testing.assert_close(model(x), before)
        lp.unmerge_adapters(model)
        torch.testing.assert_close(model(x), before)
        lp.merge_adapters(model)  # the export holds the lora_B bias too: the plain model computes the adapted one
        merged = model(x)
        lp.unmerge_adapters(model)
        plain = Stack()
        plain.load_state_dict(lp.merged_state_dict(model), strict=True)
        torch.testing.assert_close(plain(x), merged)
    with pytest.raises(ValueError, match="lora_bias=True works on linear layers"):
        lp.inject_adapters(nn.Sequential(nn.Embedding(5, 4)), lp.LoraConfig(target_modules=["0"], lora_bias=True))


def test_ia3_modules_to_save():
    model = lp.inject_adapters(Stack(), lp.IA3Config(target_modules=["v"], feedforward_modules=[],
                                                     modules_to_save=["head"]))
    assert isinstance(model.head, ModulesToSave)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.v.ia3_l.default" for i in range(3)} | {
        "head.modules_to_save.default.weight", "head.modules_to_save.default.bias"}
    assert lp.adapter_configs(model)["default"].to_dict()["modules_to_save"] == ["head"]
    assert lp.adapter_configs(model)["default"].to_dict()["feedforward_modules"] == []  # PEFT refuses null


def test_peft_adapters_carrying_the_base_embedding_load(tmp_path):
    """PEFT saves the base weight of an adapted embed_tokens (save_embedding_layers="auto"), and
    the input/output embeddings with save_embedding_layers=True: both load here (the weights go
    into the model, as in PEFT), and our file of an adapted embed_tokens has PEFT's keys."""
    import peft
    from safetensors.torch import load_file

    from conftest import tiny_llama, token_batch

    x = token_batch()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4,
                                                               init_lora_weights=False))
    with torch.no_grad():  # a base embedding that differs from the fresh model's: it must be loaded
        theirs.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
        expected = theirs(x).logits
    theirs.save_pretrained(tmp_path / "auto")
    peft_keys = set(load_file(str(tmp_path / "auto" / "adapter_model.safetensors")))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in peft_keys
    ours = lp.load_adapter(tiny_llama(), tmp_path / "auto").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-4, atol=1e-5)
    lp.save_adapter(ours, tmp_path / "ours")
    assert set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == peft_keys

    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=False))
    with torch.no_grad():
        theirs.base_model.model.lm_head.weight.mul_(0.5)
        expected = theirs(x).logits
    theirs.save_pretrained(tmp_path / "explicit", save_embedding_layers=True)
    ours = lp.load_adapter(tiny_llama(), tmp_path / "explicit").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-4, atol=1e-5)
    # trained with a resized vocabulary: the error says to resize first
    with pytest.raises(ValueError, match="resize the model's embeddings"):
        lp.load_adapter(tiny_llama(vocab=96), tmp_path / "explicit")


def _tiny(kind: str):
    """A tiny transformers model of architecture ``kind``, from its config (no download)."""
    import transformers as tf

    common = dict(vocab_size=64, max_position_embeddings=32)
    configs = {
        "llama": (tf.LlamaConfig, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1)),
        "qwen2": (tf.Qwen2Config, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1)),
        "gemma": (tf.GemmaConfig, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=8)),
        "opt": (tf.OPTConfig, dict(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                   word_embed_proj_dim=16)),
        "gpt2": (tf.GPT2Config, dict(n_embd=16, n_layer=1, n_head=2, n_positions=32)),
        "gptj": (tf.GPTJConfig, dict(n_embd=16, n_layer=1, n_head=2, n_positions=32, rotary_dim=4)),
        "gpt_neox": (tf.GPTNeoXConfig, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2)),
        "falcon": (tf.FalconConfig, dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)),
        "phi": (tf.PhiConfig, dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
    }
    cls, kwargs = configs[kind]
    config = cls(**{**common, **kwargs})
    if kind in ("gpt2", "gptj"):
        config.vocab_size = 64
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


ARCHITECTURES = ["llama", "qwen2", "gemma", "opt", "gpt2", "gptj", "gpt_neox", "falcon", "phi"]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_default_targets_follow_peft_per_architecture(kind):
    """IA3Config() and LoraConfig(target_modules=None) adapt the modules PEFT adapts by default on
    each architecture ((IA)^3: the same feed-forward ones too)."""
    import peft

    for ours_config, theirs_config in ((lp.IA3Config(), peft.IA3Config()),
                                       (lp.LoraConfig(target_modules=None), peft.LoraConfig())):
        theirs = peft.get_peft_model(_tiny(kind), theirs_config)
        expected = {p.removeprefix("base_model.model."): getattr(m, "is_feedforward", None)
                    for p, m in theirs.named_modules() if hasattr(m, "base_layer") and (
                        hasattr(m, "ia3_l") or hasattr(m, "lora_A"))}
        ours = lp.inject_adapters(_tiny(kind), ours_config)
        from lightning_peft.methods import IA3Layer
        got = {p: (m.feedforward["default"] if isinstance(m, IA3Layer) else None)
               for p, m in ours.named_modules() if isinstance(m, (IA3Layer, LoraLayer))}
        assert got == expected and got, (kind, type(ours_config).__name__)


def test_default_targets_on_a_model_outside_the_table_say_what_to_do():
    with pytest.raises(ValueError, match="no default target modules.*Name the layers yourself"):
        lp.inject_adapters(Stack(), lp.IA3Config())
    with pytest.raises(ValueError, match="no default target modules"):
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=None))
    # named targets on such a model: nothing is feed-forward unless named so
    model = lp.inject_adapters(Stack(), lp.IA3Config(target_modules=["q"]))
    assert not any(m.feedforward["default"] for m in model.modules() if hasattr(m, "feedforward"))


def test_target_parameters_on_mixtral_experts_match_peft(tmp_path):
    """LoRA on a transformers MoE's 3-D expert tensors ([experts, out, in]: gate_up_proj, down_proj,
    nested wrappers as in PEFT): PEFT's file loads with PEFT's output, merges, round-trips, and
    deleting the adapter gives the plain experts module back."""
    import copy

    import peft
    import transformers as tf
    from safetensors.torch import load_file

    config = tf.MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, vocab_size=64,
                              max_position_embeddings=32)
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(config).eval()
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_out = base(x).logits
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=None, target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=2,
        init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lp.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = theirs(x).logits
        assert (expected - base_out).abs().max() > 1e-3
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-4, atol=1e-5)
        lp.merge_adapters(ours)
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-4, atol=1e-5)
        lp.unmerge_adapters(ours)
    lp.save_adapter(ours, tmp_path / "ours")
    shapes = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert shapes == {k: v.shape for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    assert shapes["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"] == (6, 16)  # gate_up, inner
    # training reaches every expert's factors
    model = lp.inject_adapters(copy.deepcopy(base), lp.LoraConfig(target_modules=None, lora_dropout=0.0, r=2,
                                                                  target_parameters=["gate_up_proj", "down_proj"]))
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None for g in grads.values())
    lp.delete_adapter(ours, "default")
    assert type(ours.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_parameters": ["lin0.weight"]}, "set lora_dropout=0.0"),
    ({"target_parameters": ["lin0.weight"], "lora_dropout": 0.0, "use_dora": True}, "use_dora=False"),
])
def test_target_parameters_refuses_what_cannot_apply(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lp.LoraConfig(target_modules=None, **kwargs)


def test_target_parameters_errors_name_the_fix():
    with pytest.raises(ValueError, match="matches no parameter.*Closest parameter names"):
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=None, lora_dropout=0.0, target_parameters=["q.weigth"]))
    with pytest.raises(ValueError, match="target_modules and target_parameters at once"):
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], lora_dropout=0.0, target_parameters=["q.weight"]))
    model = Stack()
    with pytest.raises(ValueError, match="2-D"):  # refused before anything changes
        lp.inject_adapters(model, lp.LoraConfig(target_modules=["v"], lora_dropout=0.0, target_parameters=["q.bias"]))
    assert not _adapted(model) and not lp.adapter_configs(model)


@pytest.mark.parametrize("kind", ["gpt2", "gemma", "llama"])
def test_trainable_token_indices_match_peft(kind, tmp_path):
    """Rows of the input embedding train (GPT-2 and Gemma: the tied head follows them; Gemma's
    embedding is scaled): PEFT's file gives PEFT's logits here, merged too, and ours loads in PEFT."""
    import copy

    import peft
    from safetensors.torch import load_file

    from lightning_peft.methods import TrainableTokensLayer

    base = _tiny(kind)
    x = torch.tensor([[3, 5, 7, 11, 5, 0], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        base_out = base(x).logits
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=None if kind != "llama" else
                                                                       ["q_proj"], trainable_token_indices=[5, 7]))
    with torch.no_grad():
        values = theirs.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
        values.add_(torch.randn(values.shape, generator=torch.Generator().manual_seed(0)))  # not a constant: LayerNorm
        expected = theirs(x).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = lp.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    tied = [m for m in ours.modules() if isinstance(m, TrainableTokensLayer) and m._tied]
    assert len(tied) == (kind != "llama")  # the tied head follows the embedding's rows
    with torch.no_grad():
        assert (expected - base_out).abs().max() > 1e-3
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-4, atol=1e-5)
        lp.merge_adapters(ours)
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-4, atol=1e-5)
        lp.unmerge_adapters(ours)
        with lp.disable_adapters(ours):
            torch.testing.assert_close(ours(x).logits, base_out, rtol=1e-4, atol=1e-5)
    lp.save_adapter(ours, tmp_path / "ours")
    assert set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == set(
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, expected, rtol=1e-4, atol=1e-5)


def test_trainable_tokens_train_only_their_rows():
    from conftest import tiny_llama

    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[5, 7]))
    x = torch.tensor([[5, 1, 7, 2]])
    model(input_ids=x, labels=x).loss.backward()
    values = model.model.embed_tokens.trainable_tokens_delta["default"]
    assert values.shape == (2, 64) and values.grad is not None and values.grad.abs().sum() > 0
    assert not model.model.embed_tokens.base_layer.weight.requires_grad
    with pytest.raises(ValueError, match="outside"):
        lp.inject_adapters(tiny_llama(), lp.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[500]))
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        lp.LoraConfig(trainable_token_indices={"embed_tokens": []})
    with pytest.raises(ValueError, match="has none"):
        lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["q"], trainable_token_indices=[1]))


def test_combine_adapters_refuses_the_parts_it_cannot_add():
    model = lp.inject_adapters(Stack(), lp.LoraConfig(target_modules=["v"], lora_dropout=0.0,
                                                      target_parameters=["layers.0.q.weight"]), adapter_name="a")
    lp.inject_adapters(model, lp.LoraConfig(target_modules=["v"]), adapter_name="b")
    with pytest.raises(ValueError, match="uses target_parameters"):
        lp.combine_adapters(model, ["a", "b"], [0.5, 0.5], new_name="mix")


def test_hot_swap_updates_parameter_adapters_too(tmp_path):
    """A hot swap copies the parameter adapter's factors and takes the new lora_alpha."""
    x = torch.randn(3, 4)
    config = dict(target_modules=None, lora_dropout=0.0, target_parameters=["layers.1.q.weight"], init_lora_weights=False)
    trained = lp.inject_adapters(Stack(), lp.LoraConfig(lora_alpha=3, **config))
    lp.save_adapter(trained, tmp_path)
    model = lp.inject_adapters(Stack(), lp.LoraConfig(lora_alpha=32, **config))
    lp.hot_swap_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))
