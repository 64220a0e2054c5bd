"""Many adapters over one base: mixed-adapter batches against each row run alone, combining
adapters against float64 formulas and HF PEFT's add_weighted_adapter, hot swap in place."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import max_abs, realistic_adapter, tiny_gpt2, tiny_llama, token_batch
from torch.utils.data import DataLoader

import lightning_peft as lp
from lightning_peft.methods import LoraLayer

# four adapters of different ranks and targets (embedding included; "d" is DoRA)
ADAPTERS = {
    "a": lp.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False),
    "b": lp.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=True, init_lora_weights=False),
    "c": lp.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "embed_tokens"],
                       init_lora_weights=False),
    "d": lp.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, use_dora=True, target_modules=["k_proj", "down_proj"],
                       init_lora_weights=False),
}
IDS = ["a", None, "c", "b", "d", "a", "__base__", "d"]


def _model(names=ADAPTERS, quantized=False, seed=0):
    model = tiny_llama(seed=seed)
    if quantized:
        lp.quantize_base(model, lp.QuantConfig(compute_dtype=torch.float32))
    for i, name in enumerate(names):
        lp.inject_adapters(model, ADAPTERS[name], adapter_name=name)
        realistic_adapter(model, name, seed=i)
    return model


def _each_row_alone(model, input_ids, ids):
    """The reference: row n run on its own, with adapter ids[n] active (or adapters off)."""
    rows = []
    with torch.no_grad():
        for row, name in zip(input_ids, ids):
            if name in (None, "__base__"):
                with lp.disable_adapters(model):
                    rows.append(model(input_ids=row[None]).logits)
            else:
                with lp.use_adapter(model, name):
                    rows.append(model(input_ids=row[None]).logits)
    return torch.cat(rows)


def _spy_grouped(monkeypatch) -> list:
    """The LoRA layers that ran the grouped path (short rows sorted by adapter), call by call."""
    calls, grouped = [], LoraLayer._grouped_forward

    def spy(self, *args):
        calls.append(self)
        return grouped(self, *args)

    monkeypatch.setattr(LoraLayer, "_grouped_forward", spy)
    return calls


# ---------------------------------------------------------------------------- mixed batches
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("ids, expect_grouped", [
    (["a", "b", None, "b", "a", None], True),  # equal groups, base rows as a group of their own
    (["a", "c", "a", "c"], True),  # on q_proj/v_proj slots 1 and 3: the stack is indexed, not sliced
    (["a"] * 5 + ["b"] * 5 + [None] * 6, True),  # 16 rows as 3 x 6: 2 padding rows, the most allowed
    (["a", "a", "a", "b"], False),  # 2 x 3 would pad 2 of 4 rows: per-row path
], ids=["equal", "non_consecutive", "padded", "too_uneven"])
def test_short_rows_run_grouped_and_equal_each_row_alone(quantized, ids, expect_grouped, monkeypatch):
    """Rows with fewer tokens than the stacked rank (decoding) run sorted into one group per adapter:
    the base layer on the sorted rows, the adapters on views of the stack, the rows put back. Also
    under torch.inference_mode (Trainer.predict's default), whose tensors have no version counter."""
    model = _model(names=["a", "b", "c"], quantized=quantized)
    input_ids = token_batch(batch=len(ids), seq=3, seed=5)
    reference = _each_row_alone(model, input_ids, ids)
    grouped = _spy_grouped(monkeypatch)
    with torch.no_grad(), lp.adapter_ids(model, ids):
        mixed = model(input_ids=input_ids).logits
    with torch.inference_mode(), lp.adapter_ids(model, ids):
        inference = model(input_ids=input_ids).logits
    assert max_abs(mixed, reference) <= 1e-5 and max_abs(inference, reference) <= 1e-5
    assert bool(grouped) == expect_grouped
    with torch.no_grad(), lp.use_adapter(model, "a"):
        assert max_abs(model(input_ids=input_ids).logits, reference) > 1e-2


def test_layers_fed_one_tensor_share_its_sorting_until_it_changes(monkeypatch):
    """q/k/v-like siblings reuse the sorted input; an in-place change of the input between them
    (version counter) makes the second sort again. The memo is dropped when the block ends."""
    from torch import nn

    from lightning_peft.methods import mixed as batches

    class Siblings(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.third = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            out = self.first(x) + self.second(x)  # the same tensor twice: sorted once
            x.mul_(2.0)  # changed in place before the third layer sees it
            return out + self.third(x)

    torch.manual_seed(0)
    model = Siblings()
    for name in ("p", "q"):
        lp.inject_adapters(model, lp.LoraConfig(r=4, lora_dropout=0.0, target_modules=["first", "second", "third"],
                                                init_lora_weights=False), adapter_name=name)
    model.eval()
    x, ids = torch.randn(4, 1, 8), ["p", "q", "p", "q"]  # 1 token per row, fewer than r: grouped
    grouped = _spy_grouped(monkeypatch)
    with torch.no_grad():
        alone = []
        for row, name in zip(x, ids):
            with lp.use_adapter(model, name):
                alone.append(model(row[None].clone()))
        with lp.adapter_ids(model, ids):
            mixed = model(x.clone())
            assert batches._LAST_SORTED[0] is not None
    assert len(grouped) == 3 and max_abs(mixed, torch.cat(alone)) <= 1e-5
    assert batches._LAST_SORTED[0] is None and batches._LAST_ROW_GROUPS[0] is None


def test_grouping_steps_aside_for_hooks_dora_rows_and_long_rows(monkeypatch):
    """A hook on a base layer must see the batch's rows in their order, so that layer runs per row;
    so do layers where a row runs DoRA, and rows as long as the stacked rank."""
    model = _model()  # "d" (DoRA, r=16) sits on k_proj and down_proj
    q_proj = model.model.layers[0].self_attn.q_proj
    seen = []
    handle = q_proj.base_layer.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    ids = ["a", "d", "b", "a", "d", "b"]  # equal groups; where "d" is not, its rows run the base
    input_ids = token_batch(batch=6, seq=3, seed=6)
    reference = _each_row_alone(model, input_ids, ids)
    seen.clear()
    grouped = _spy_grouped(monkeypatch)
    try:
        with torch.no_grad(), lp.adapter_ids(model, ids):
            mixed = model(input_ids=input_ids).logits
    finally:
        handle.remove()
    assert max_abs(mixed, reference) <= 1e-5
    assert grouped and q_proj not in grouped  # the other layers without DoRA rows did run grouped
    assert not any("d" in layer.lora_magnitude_vector for layer in grouped)
    with torch.no_grad():  # the hook saw the rows in the batch's order: row 0 alone gives its first row
        first = []
        handle = q_proj.base_layer.register_forward_hook(lambda module, args, output: first.append(args[0]))
        with lp.use_adapter(model, "a"):
            model(input_ids=input_ids[:1])
        handle.remove()
    assert max_abs(seen[0][:1], first[0]) <= 1e-5
    grouped.clear()
    attention = model.model.layers[0].self_attn  # v_proj stacks ranks up to 8 (a, b, c); k_proj up to 16 (d)
    with torch.no_grad(), lp.adapter_ids(model, ["a", "b"]):
        model(input_ids=token_batch(batch=2, seq=8))  # 8 tokens per row
    assert attention.k_proj in grouped and attention.v_proj not in grouped


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_mixed_batch_equals_each_row_alone(quantized):
    model = _model(quantized=quantized)
    input_ids = token_batch(batch=len(IDS), seq=10)
    reference = _each_row_alone(model, input_ids, IDS)
    with torch.no_grad(), lp.adapter_ids(model, IDS):
        mixed = model(input_ids=input_ids).logits
    assert max_abs(mixed, reference) <= 1e-5
    # the adapters really differ per row (a mixed batch that ran one adapter everywhere would fail)
    with torch.no_grad(), lp.use_adapter(model, "a"):
        assert max_abs(model(input_ids=input_ids).logits, reference) > 1e-2


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("seq", [12, 3], ids=["per_row", "grouped"])
def test_mixed_and_single_adapter_forward_under_bf16_autocast(quantized, grad, seq, monkeypatch):
    """Autocast makes the adapter matmuls bf16 while a 4-bit base computes in fp32: the fused
    in-place accumulation must step aside (it raised a dtype error over NF4 without grad).
    Checked against the fp32 per-row reference: far closer to it than to the swapped adapters."""
    model = _model(names=["a", "b"], quantized=quantized)
    input_ids, ids = token_batch(batch=3, seq=seq), ["a", "b", None]
    reference = _each_row_alone(model, input_ids, ids)
    swapped = _each_row_alone(model, input_ids, ["b", "a", None])
    grouped = _spy_grouped(monkeypatch)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        with lp.adapter_ids(model, ids):
            mixed = model(input_ids=input_ids).logits.float()
        with lp.use_adapter(model, "b"):
            single = model(input_ids=input_ids[1:2]).logits.float()
    wrong = max_abs(swapped[:2], reference[:2])
    assert max_abs(mixed, reference) <= 0.25 * wrong
    assert max_abs(single, reference[1:2]) <= 0.25 * wrong
    assert bool(grouped) == (seq == 3)


def test_generate_with_per_row_adapters_equals_each_row_alone():
    """Serving: greedy decoding with a KV cache, every step a mixed batch of one token per row
    (the stack and the row index are reused across steps), equals each row decoded alone."""
    model = _model()
    prompts, ids = token_batch(batch=4, seq=6, seed=3), ["d", None, "b", "c"]
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lp.adapter_ids(model, ids):
        mixed = model.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
    alone = []
    for row, name in zip(prompts, ids):
        context = lp.disable_adapters(model) if name is None else lp.use_adapter(model, name)
        with torch.no_grad(), context:
            alone.append(model.generate(row[None], attention_mask=torch.ones_like(row[None]), **settings))
    assert torch.equal(mixed, torch.cat(alone))
    assert len({tuple(r[6:].tolist()) for r in mixed}) > 1  # the rows' continuations differ
    # requests of unequal length: row 2 ("b") left-padded by 3 continues as its 3 tokens alone do
    padded, mask = prompts.clone(), torch.ones_like(prompts)
    padded[2, :3], mask[2, :3] = 0, 0
    with torch.no_grad(), lp.adapter_ids(model, ids):
        mixed = model.generate(padded, attention_mask=mask, **settings)
    with torch.no_grad(), lp.use_adapter(model, "b"):
        short = model.generate(prompts[2:3, 3:], attention_mask=torch.ones_like(prompts[2:3, 3:]), **settings)
    assert torch.equal(mixed[2, 6:], short[0, 3:]) and torch.equal(mixed[[0, 1, 3]], torch.cat(alone)[[0, 1, 3]])
    # a generate that multiplies the rows needs one id per copy: said, with the fix
    with torch.no_grad(), lp.adapter_ids(model, ids), pytest.raises(ValueError, match="repeat each id"):
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=2, do_sample=True,
                       num_return_sequences=2, pad_token_id=0)
    with torch.no_grad(), lp.adapter_ids(model, [i for i in ids for _ in range(2)]):  # each id repeated in place
        sampled = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=2, do_sample=True,
                                 num_return_sequences=2, pad_token_id=0)
    assert sampled.shape == (8, 8) and torch.equal(sampled[::2, :6], prompts)


def test_mixed_batch_over_gpt2_conv1d_layers():
    model = tiny_gpt2()
    for i, r in enumerate((2, 6)):
        lp.inject_adapters(model, lp.LoraConfig(r=r, lora_dropout=0.0, init_lora_weights=False), adapter_name=f"g{i}")
        realistic_adapter(model, f"g{i}", seed=i)
    input_ids, ids = token_batch(batch=3), ["g1", None, "g0"]
    with torch.no_grad(), lp.adapter_ids(model, ids):
        mixed = model(input_ids=input_ids).logits
    assert max_abs(mixed, _each_row_alone(model, input_ids, ids)) <= 1e-5


@pytest.mark.parametrize("seq", [12, 3], ids=["per_row", "grouped"])
def test_training_mode_applies_each_rows_own_dropout(seq, monkeypatch):
    model = _model(names=["a", "b"])
    lp.inject_adapters(model, lp.LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False), adapter_name="drop")
    realistic_adapter(model, "drop", seed=9)
    input_ids, ids = token_batch(batch=3, seq=seq), ["drop", "b", None]
    grouped = _spy_grouped(monkeypatch)
    reference = _each_row_alone(model, input_ids, ids)  # eval mode: no dropout anywhere
    model.train()
    with torch.no_grad(), lp.adapter_ids(model, ids):
        mixed = model(input_ids=input_ids).logits
    assert max_abs(mixed[1:], reference[1:]) <= 1e-5  # p = 0 rows are exact
    assert max_abs(mixed[0], reference[0]) > 1e-3  # the p = 0.5 row was dropped out
    assert bool(grouped) == (seq == 3)


def test_mixed_ranks_are_zero_padded_in_one_stack():
    model = _model()
    layer = model.model.layers[0].self_attn.k_proj  # holds a (r=4), b (r=8), d (r=16, DoRA)
    with torch.no_grad(), lp.adapter_ids(model, IDS):
        model(input_ids=token_batch(batch=len(IDS)))
    stack = layer._stack_cache
    assert stack["A"].shape == (4, 64, 16) and stack["B"].shape == (4, 16, layer.out_features)
    assert stack["A"][1, :, 4:].abs().max() == 0 and stack["B"][0].abs().max() == 0


def test_stack_cache_is_reused_and_rebuilt_after_in_place_updates():
    model = _model(names=["a", "b"])
    input_ids = token_batch(batch=3)
    ids = ["a", "b", None]
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), lp.adapter_ids(model, ids):
        model(input_ids=input_ids)
        first = layer._stack_cache
        model(input_ids=input_ids)
        assert layer._stack_cache is first  # no re-stacking while nothing changed
        for module in model.modules():  # an optimizer-like in-place step on adapter "b"
            if isinstance(module, LoraLayer) and "b" in module.scaling:
                module.lora_B["b"].weight.mul_(-2.0)
        mixed = model(input_ids=input_ids).logits
        assert layer._stack_cache is not first
    assert max_abs(mixed, _each_row_alone(model, input_ids, ids)) <= 1e-5


def _mixed_error(model, input_ids, ids) -> float:
    with torch.no_grad(), lp.adapter_ids(model, ids):
        mixed = model(input_ids=input_ids).logits
    return max_abs(mixed, _each_row_alone(model, input_ids, ids))


def _lora_layers_with(model, name):
    return [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.scaling]


def test_stack_cache_follows_replaced_tensors_dtype_scaling_and_merges():
    """What replaces tensors (not in place) must drop the cache: a stale stack would give the old
    adapter's (or the old dtype's) outputs. Each step below changes what the rows must compute."""
    model = _model(names=["a", "b", "d"])
    input_ids, ids = token_batch(batch=4), ["a", "b", None, "d"]
    assert _mixed_error(model, input_ids, ids) <= 1e-5  # the caches now exist
    # load_state_dict(assign=True): new tensor objects, fresh version counters
    state = {k: (v * 3.0 if ".lora_B.b." in k else v) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert _mixed_error(model, input_ids, ids) <= 1e-5
    # .double(): float64 tensors; a stale fp32 stack would be off by ~1e-7, far above 1e-12
    model.double()
    assert _mixed_error(model, input_ids, ids) <= 1e-12
    model.float()
    assert _mixed_error(model, input_ids, ids) <= 1e-5
    # a scaling changed without touching a tensor (as a hot swap with a new lora_alpha does)
    for layer in _lora_layers_with(model, "a"):
        layer.scaling["a"] *= -1.5
    assert _mixed_error(model, input_ids, ids) <= 1e-5
    # merge then unmerge DoRA "d": the base weight is rewritten in place twice
    lp.merge_adapters(model, "d")
    lp.unmerge_adapters(model)
    assert _mixed_error(model, input_ids, ids) <= 1e-5
    # a tensor assigned by hand is the documented blind spot: clear_adapter_caches fixes it
    for layer in _lora_layers_with(model, "b"):
        weight = layer.lora_A["b"].weight
        weight.data = torch.randn_like(weight)
    lp.clear_adapter_caches(model)
    assert _mixed_error(model, input_ids, ids) <= 1e-5


def test_a_mixed_batch_with_grad_drops_the_cache():
    """Training through a mixed batch builds the stack fresh and drops the cached one, so a later
    no-grad batch sees even a change the version counters cannot (a tensor assigned by hand)."""
    model = _model(names=["a", "b"])
    input_ids, ids = token_batch(batch=3), ["a", "b", None]
    assert _mixed_error(model, input_ids, ids) <= 1e-5  # cached
    lp.set_adapter(model, "b")  # "b" trains
    with lp.adapter_ids(model, ids):
        model(input_ids=input_ids).logits.sum().backward()
    for layer in _lora_layers_with(model, "b"):
        weight = layer.lora_B["b"].weight
        weight.data = weight.data * -2.0  # an optimizer that swaps storage instead of stepping in place
    assert _mixed_error(model, input_ids, ids) <= 1e-5


def test_deleting_and_adding_adapters_rebuilds_the_stack():
    model = _model(names=["a", "b"])
    input_ids = token_batch(batch=3)
    assert _mixed_error(model, input_ids, ["a", "b", None]) <= 1e-5
    lp.delete_adapter(model, "a")
    lp.inject_adapters(model, ADAPTERS["c"], adapter_name="a")  # a new "a": other rank and targets
    realistic_adapter(model, "a", seed=7)
    assert _mixed_error(model, input_ids, ["a", "b", None]) <= 1e-5


@pytest.mark.parametrize("seq, ids", [(12, ["a", "b", None, "b"]), (3, ["a", "b", "b", "a"])],
                         ids=["per_row", "grouped"])
def test_gradients_through_a_mixed_batch_equal_per_row_gradients(seq, ids, monkeypatch):
    model = _model(names=["a", "b"])
    grouped = _spy_grouped(monkeypatch)
    lp.set_adapter(model, "a")
    params = [p for m in model.modules() if isinstance(m, LoraLayer) for n in ("a", "b")
              for p in m.adapter_state(n).values()]
    for p in params:
        p.requires_grad_(True)
    input_ids = token_batch(batch=4, seq=seq)
    with lp.adapter_ids(model, ids):
        model(input_ids=input_ids).logits.square().mean(dim=(1, 2)).sum().backward()
    assert bool(grouped) == (seq == 3)
    mixed = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    for row, name in zip(input_ids, ids):
        if name is None:
            continue
        with lp.use_adapter(model, name):
            model(input_ids=row[None]).logits.square().mean().backward()
    assert max(max_abs(g, p.grad) for g, p in zip(mixed, params)) <= 1e-6


def test_without_ids_the_lora_forward_is_bit_identical():
    model = _model(names=["a", "b"])
    input_ids = token_batch(batch=3)
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        with lp.adapter_ids(model, ["b", "a", None]):
            model(input_ids=input_ids)
        after = model(input_ids=input_ids).logits
    assert torch.equal(before, after)
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, LoraLayer))


def test_bad_ids_are_refused_with_the_fix():
    model = _model(names=["a", "b"])
    with pytest.raises(ValueError, match=r"does not have: \['zz'\]"), lp.adapter_ids(model, ["a", "zz"]):
        pass
    with pytest.raises(ValueError, match="one id per row"), torch.no_grad(), lp.adapter_ids(model, ["a", "b"]):
        model(input_ids=token_batch(batch=3))
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, LoraLayer))
    lp.merge_adapters(model, "a")
    with pytest.raises(RuntimeError, match="unmerge_adapters"), lp.adapter_ids(model, ["a", "b"]):
        pass


def test_other_adapter_modules_raise_or_run_the_base():
    model = tiny_llama()
    lp.inject_adapters(model, lp.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"],
                                            modules_to_save=["lm_head"]), adapter_name="head")
    lp.inject_adapters(model, lp.LoraConfig(r=4, init_lora_weights=False, target_modules=["v_proj"]), adapter_name="v")
    with torch.no_grad():
        model.lm_head.modules_to_save["head"].weight.mul_(2.0)
    with pytest.raises(NotImplementedError, match=r"lm_head .*ModulesToSave.*\['head'\].*use_adapter"), lp.adapter_ids(model, ["head", "v"]):
        pass
    input_ids = token_batch(batch=2)
    with torch.no_grad(), lp.adapter_ids(model, ["v", None]):  # lm_head holds neither: runs the original
        mixed = model(input_ids=input_ids).logits
    assert max_abs(mixed, _each_row_alone(model, input_ids, ["v", None])) <= 1e-5
    assert not model.lm_head.disabled


def test_ia3_adapters_refuse_mixing_and_stay_off_for_other_rows():
    model = tiny_llama()
    lp.inject_adapters(model, lp.LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "o_proj"]),
                       adapter_name="lo")
    lp.inject_adapters(model, lp.IA3Config(), adapter_name="ia")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.mul_(1.5)
    with pytest.raises(NotImplementedError, match=r"IA3Layer.*\['ia'\].*only LoRA layers"), lp.adapter_ids(model, ["ia", "lo"]):
        pass
    input_ids = token_batch(batch=2)
    with torch.no_grad(), lp.adapter_ids(model, ["lo", None]):
        mixed = model(input_ids=input_ids).logits
    assert max_abs(mixed, _each_row_alone(model, input_ids, ["lo", None])) <= 1e-5
    with pytest.raises(TypeError, match="IA3Config, not LoRA"):
        lp.combine_adapters(model, ["lo", "ia"], [1, 1], new_name="x")


class _Serving(L.LightningModule):
    """predict_step for batches that carry one adapter id per row."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def predict_step(self, batch, batch_idx):
        with lp.adapter_ids(self.model, batch["adapter_ids"]):
            return self.model(input_ids=batch["input_ids"]).logits


def test_trainer_predict_with_per_row_adapter_ids():
    model = _model(names=["a", "b", "c"])
    input_ids = token_batch(batch=6, seq=8)
    ids = ["a", "b", "__base__", "c", "c", "a"]
    requests = [{"input_ids": row, "adapter_ids": name} for row, name in zip(input_ids, ids)]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = trainer.predict(_Serving(model), DataLoader(requests, batch_size=3))
    assert max_abs(torch.cat(out), _each_row_alone(model, input_ids, ids)) <= 1e-5


# ------------------------------------------------------------------------------------ combining
def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _expected_delta(layer, names, weights):
    """``sum_i w_i s_i B_i A_i`` in float64 over the adapters this layer holds."""
    total = 0
    for n, w in zip(names, weights):
        if n in layer.scaling:
            A, B = (t.double() for t in layer._factors(n))
            total = total + w * layer.scaling[n] * (B @ A)
    return total


def test_cat_is_exact_and_svd_at_full_rank_is_exact():
    model = _model(names=["a", "b", "c"])
    names, weights = ["a", "b", "c"], [0.7, -1.3, 2.0]
    lp.combine_adapters(model, names, weights, method="cat", new_name="cat")
    lp.combine_adapters(model, names, weights, method="svd", new_name="svd", svd_rank=4 + 8 + 2)
    assert lp.adapter_configs(model)["cat"].r == 14
    for layer in _lora_layers(model):
        expected = _expected_delta(layer, names, weights)
        scale = expected.norm().item()
        assert (layer.delta_weight("cat").double() - expected).norm().item() <= 1e-6 * scale
        assert (layer.delta_weight("svd").double() - expected).norm().item() <= 1e-5 * scale
    # the active adapter and the trainable set did not change
    assert {m.active_adapter for m in _lora_layers(model)} == {"c"}
    assert not any(p.requires_grad for m in _lora_layers(model) for p in m.adapter_state("cat").values())


def test_linear_matches_its_formula():
    model = _model(names=["a"])
    lp.inject_adapters(model, lp.LoraConfig(r=4, lora_alpha=2, init_lora_weights=False), adapter_name="a2")
    realistic_adapter(model, "a2", seed=5)
    names, weights = ["a", "a2"], [0.5, -0.8]
    lp.combine_adapters(model, names, weights, method="linear", new_name="lin")
    for layer in _lora_layers(model):
        A_ref, B_ref = 0, 0
        for n, w in zip(names, weights):
            ws = w * layer.scaling[n]
            A, B = (t.double() for t in layer._factors(n))
            A_ref = A_ref + (1 if ws >= 0 else -1) * abs(ws) ** 0.5 * A
            B_ref = B_ref + abs(ws) ** 0.5 * B
        A_new, B_new = layer._factors("lin")
        assert max_abs(A_new, A_ref) <= 1e-6 and max_abs(B_new, B_ref) <= 1e-6
        assert layer.scaling["lin"] == 1.0


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_combination_matches_hf_peft_add_weighted_adapter(method, tmp_path):
    peft = pytest.importorskip("peft")
    model = _model(names=["a"])
    lp.inject_adapters(model, lp.LoraConfig(r=4, lora_alpha=2, init_lora_weights=False), adapter_name="e")
    realistic_adapter(model, "e", seed=7)
    for name in ("a", "e"):
        lp.save_adapter(model, tmp_path / name, adapter_name=name)
    weights = [1.5, -0.6]
    lp.combine_adapters(model, ["a", "e"], weights, method=method, new_name="new")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "e"), adapter_name="e")
    theirs.add_weighted_adapter(["a", "e"], weights, adapter_name="new", combination_type=method)
    ours_state = lp.checkpoint.adapter_tensors(model, "new")
    theirs_state = peft.get_peft_model_state_dict(theirs, adapter_name="new")
    assert ours_state.keys() == theirs_state.keys()
    for key in ours_state:
        if method != "svd" or key.endswith("lora_A.weight"):
            continue  # svd: singular vectors are defined up to sign; compare B A below
        A_key = key.replace("lora_B", "lora_A")
        ours_delta = ours_state[key] @ ours_state[A_key]
        theirs_delta = theirs_state[key] @ theirs_state[A_key]
        assert max_abs(ours_delta, theirs_delta) <= 1e-5
    if method != "svd":
        assert max(max_abs(ours_state[k], theirs_state[k]) for k in ours_state) <= 1e-6


def test_combine_refuses_what_has_no_weighted_sum():
    model = _model(names=["a", "b", "d"])
    with pytest.raises(ValueError, match="DoRA"):
        lp.combine_adapters(model, ["a", "d"], [1, 1], new_name="x")
    with pytest.raises(ValueError, match='one rank, got ranks \\[4, 8\\]; use "cat" or "svd"'):
        lp.combine_adapters(model, ["a", "b"], [1, 1], method="linear", new_name="x")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        lp.combine_adapters(model, ["a", "b"], [1], new_name="x")
    assert "x" not in lp.adapter_configs(model)


# ------------------------------------------------------------------------------------- hot swap
def _saved(tmp_path, name, seed, **overrides):
    model = tiny_llama()
    config = lp.LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False, **overrides})
    lp.inject_adapters(model, config)
    realistic_adapter(model, seed=seed)
    return lp.save_adapter(model, tmp_path / name)


def test_hot_swap_equals_a_fresh_load_and_keeps_every_storage(tmp_path):
    first, second = _saved(tmp_path, "first", 1), _saved(tmp_path, "second", 2, lora_alpha=16)
    model = lp.load_adapter(tiny_llama(), first, adapter_name="served")
    lp.inject_adapters(model, ADAPTERS["a"], adapter_name="other")
    realistic_adapter(model, "other", seed=3)
    tensors = lp.checkpoint.adapter_tensors(model, "served")
    pointers = {k: t.data_ptr() for k, t in tensors.items()}
    input_ids = token_batch(batch=2)
    with torch.no_grad(), lp.adapter_ids(model, ["served", "other"]):
        model(input_ids=input_ids)  # fills the stacked-adapter cache before the swap
    lp.hot_swap_adapter(model, second, adapter_name="served")

    fresh = lp.load_adapter(tiny_llama(), second)
    with torch.no_grad():
        expected = fresh(input_ids=input_ids).logits
        with lp.use_adapter(model, "served"):
            swapped = model(input_ids=input_ids).logits
        with lp.adapter_ids(model, ["served", "served"]):
            mixed = model(input_ids=input_ids).logits
    assert max_abs(swapped, expected) <= 1e-6 and max_abs(mixed, expected) <= 1e-5
    after = lp.checkpoint.adapter_tensors(model, "served")
    assert {k: t.data_ptr() for k, t in after.items()} == pointers
    assert all(after[k] is tensors[k] for k in tensors)
    assert lp.adapter_configs(model)["served"].lora_alpha == 16


def test_a_compiled_model_keeps_running_through_a_hot_swap(tmp_path):
    """torch.compile (dynamo + AOT autograd, no C++ build) treats the adapter tensors as graph
    inputs: after an in-place hot swap the same compiled graph computes the new adapter, with no
    recompilation. Mixed batches run compiled too (one graph: tests/test_compile.py)."""
    from torch._dynamo.utils import counters

    first, second = _saved(tmp_path, "first", 1), _saved(tmp_path, "second", 2)
    input_ids = token_batch(batch=2)
    expected = {}
    with torch.no_grad():
        for path in (first, second):
            expected[path] = lp.load_adapter(tiny_llama(), path).eval()(input_ids=input_ids).logits

    model = lp.load_adapter(tiny_llama(), first).eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert max_abs(compiled(input_ids=input_ids).logits, expected[first]) <= 1e-6
        lp.hot_swap_adapter(model, second)
        assert max_abs(compiled(input_ids=input_ids).logits, expected[second]) <= 1e-6
        assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]

        lp.inject_adapters(model, ADAPTERS["a"], adapter_name="a")
        realistic_adapter(model, "a", seed=4)
        lp.set_adapter(model, "default", trainable=False)
        ids = ["a", "default"]
        torch._dynamo.reset()
        with lp.adapter_ids(model, ids):  # dynamo alone: fast
            mixed = torch.compile(model, backend="eager")(input_ids=input_ids).logits
    assert max_abs(mixed, _each_row_alone(model, input_ids, ids)) <= 1e-5
    torch._dynamo.reset()


def test_a_model_built_under_inference_mode_mixes_and_hot_swaps(tmp_path):
    """Tensors made under torch.inference_mode have no version counter: the stack cache must not
    read one (it raised), and a hot swap (same alpha: no scaling change to notice) drops the cache."""
    first, second = _saved(tmp_path, "first", 1), _saved(tmp_path, "second", 2)
    input_ids = token_batch(batch=2)
    with torch.inference_mode():
        model = lp.load_adapter(tiny_llama(), first, adapter_name="served")
        lp.inject_adapters(model, ADAPTERS["a"], adapter_name="other")
        realistic_adapter(model, "other", seed=3)
        reference = _each_row_alone(model, input_ids, ["served", "other"])
        with lp.adapter_ids(model, ["served", "other"]):
            mixed = model(input_ids=input_ids).logits
        lp.hot_swap_adapter(model, second, adapter_name="served")
        with lp.adapter_ids(model, ["served", "served"]):
            swapped = model(input_ids=input_ids).logits
        expected = lp.load_adapter(tiny_llama(), second)(input_ids=input_ids).logits
    assert max_abs(mixed, reference) <= 1e-5
    assert max_abs(swapped, expected) <= 1e-5


def test_hot_swap_mismatch_leaves_the_model_untouched(tmp_path):
    first, other_rank = _saved(tmp_path, "first", 1), _saved(tmp_path, "r8", 2, r=8)
    model = lp.load_adapter(tiny_llama(), first)
    before = {k: t.clone() for k, t in lp.checkpoint.adapter_tensors(model).items()}
    with pytest.raises(ValueError, match=r"shape mismatch.*file \(8, 64\) vs model \(4, 64\)[\s\S]*load_adapter"):
        lp.hot_swap_adapter(model, other_rank)
    assert all(torch.equal(t, before[k]) for k, t in lp.checkpoint.adapter_tensors(model).items())
    assert lp.adapter_configs(model)["default"].r == 4
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        lp.hot_swap_adapter(model, first, adapter_name="zz")
