"""Models bigger than memory: empty_init + load_quantized, the strategy's checkpoint=, gradient
checkpointing, and scripts/big_70b.py at a tiny size.

The memory tests run in fresh subprocesses (this file is also their entry point:
``python tests/test_big_models.py <worker> <args>``). Each measures its peak RSS growth over the
loading (or the fit): ``VmRSS`` before, then ``VmHWM`` after, the high-water mark reset by writing
5 to ``/proc/self/clear_refs`` (``ru_maxrss`` of an exec'd child can carry the parent's peak).
File pages that safetensors memory-maps count in RSS while mapped, so a streamed tensor's pages
are counted too: the bound charges them to the 3 x largest-tensor term.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6

# ~106M parameters: 7 layers x 12.85M (linear) + 2 x 8.2M (embedding, untied lm_head); fp32 425 MB,
# largest tensor the embedding (8000 x 1024 x 4 B = 32.8 MB)
BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=7, num_attention_heads=16,
           num_key_value_heads=16, vocab_size=8000, max_position_embeddings=256, tie_word_embeddings=False)


# ----------------------------------------------------------------------------- subprocess side
def _rss_now() -> float:
    return _status("VmRSS")


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _start_measuring() -> float:
    """Reset the peak-RSS mark; the RSS now (the baseline)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_now()


def _digest(model, base_only: bool = False) -> str:
    """sha256 over every state-dict tensor's bytes (4-bit weights and their quantization state too);
    ``base_only``: the frozen base alone (adapter tensors left out, keys as before injection)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if base_only:
            if "lora_" in key:
                continue
            key = key.replace(".base_layer", "")
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _finish(model, baseline: float, out: str, **extra) -> None:
    import lightning_peft as lp

    peak = _status("VmHWM") - baseline
    ids = torch.randint(0, BIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(ids).logits
    torch.save(logits, out + ".logits.pt")
    report = lp.memory_report(model, show=False)
    Path(out).write_text(json.dumps({"peak_growth": peak, "model_bytes": report.total_bytes,
                                     "digest": _digest(model), **extra}))


def worker_stream(checkpoint: str, out: str) -> None:
    """empty_init + load_quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lightning_peft as lp

    config = LlamaConfig(**BIG)
    baseline = _start_measuring()
    with lp.empty_init():
        model = LlamaForCausalLM(config)
    lp.load_quantized(model, checkpoint, lp.QuantConfig(), device="cpu")
    _finish(model, baseline, out)


def worker_naive(checkpoint: str, out: str) -> None:
    """Build in float, load the state dict, quantize_base."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import lightning_peft as lp

    config = LlamaConfig(**BIG)
    baseline = _start_measuring()
    model = LlamaForCausalLM(config)
    index = json.loads(Path(checkpoint).read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(Path(checkpoint).parent / shard))
    model.load_state_dict(state)
    del state
    lp.quantize_base(model, lp.QuantConfig())
    _finish(model, baseline, out)


def worker_trainer(checkpoint: str, out: str) -> None:
    """Trainer(strategy="qlora"), the module building and loading its model in configure_model."""
    import lightning as L
    from transformers import LlamaConfig, LlamaForCausalLM

    import lightning_peft as lp

    class BigLM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = None

        def configure_model(self):
            if self.model is not None:
                return
            self.model = LlamaForCausalLM(LlamaConfig(**BIG))  # on meta: the strategy's context
            strategy = self.trainer.strategy
            lp.load_quantized(self.model, checkpoint, strategy.quant_config, device=strategy.root_device)

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = torch.randint(0, BIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(list(data), batch_size=1)
    module = BigLM()
    trainer = L.Trainer(strategy="qlora", accelerator="cpu", devices=1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    baseline = _start_measuring()
    trainer.fit(module, loader)
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    _finish(module.model, baseline, out, steps=trainer.global_step,
            lora_b_moved=all(bool(b.abs().sum() > 0) for b in lora_b), n_lora_b=len(lora_b),
            loss=float(trainer.callback_metrics["loss"]))


WORKERS = {"stream": worker_stream, "naive": worker_naive, "trainer": worker_trainer}


# -------------------------------------------------------------------------------- test side
def _run(worker: str, checkpoint: Path, tmp_path: Path, **env_vars: str) -> tuple[dict, torch.Tensor]:
    out = tmp_path / f"{worker}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **env_vars}
    result = subprocess.run([sys.executable, __file__, worker, str(checkpoint), str(out)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), torch.load(str(out) + ".logits.pt")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, int, int]:
    """A ~106M-parameter fp32 Llama in two safetensors shards + index: (index path, float bytes,
    largest tensor bytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("big_llama")
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in LlamaForCausalLM(LlamaConfig(**BIG)).state_dict().items()}
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, folder / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total},
                                 "weight_map": {k: name for name, names in shards.items() for k in names}}))
    largest = max(t.numel() * t.element_size() for t in state.values())
    return index, total, largest


def test_stream_peak_is_bounded_and_naive_is_not(big_checkpoint, tmp_path):
    index, float_bytes, largest = big_checkpoint
    stream, stream_logits = _run("stream", index, tmp_path)
    naive, naive_logits = _run("naive", index, tmp_path)
    bound = stream["model_bytes"] + 3 * largest + 150 * MB
    print(f"\nfloat {float_bytes / MB:.0f} MB, loaded model {stream['model_bytes'] / MB:.0f} MB, largest tensor "
          f"{largest / MB:.1f} MB; peak growth: streamed {stream['peak_growth'] / MB:.0f} MB (bound {bound / MB:.0f}), "
          f"naive {naive['peak_growth'] / MB:.0f} MB")
    assert stream["peak_growth"] <= bound
    assert naive["peak_growth"] > float_bytes
    assert stream["digest"] == naive["digest"]  # the same 4-bit bytes, quantization state and float tensors
    assert torch.equal(stream_logits, naive_logits)


def test_trainer_qlora_configure_model_peak_is_bounded(big_checkpoint, tmp_path):
    index, float_bytes, largest = big_checkpoint
    # The training step's CPU 4-bit kernels allocate a dequantized weight per layer and matmul;
    # with glibc's sliding mmap threshold those land in the heap and stay there (+160 MB RSS over
    # the forward here, none of it live). A fixed threshold returns them, as a GPU's caching
    # allocator would keep them for reuse; loading itself needs no such help (see the test above).
    fit, _ = _run("trainer", index, tmp_path, MALLOC_MMAP_THRESHOLD_="65536")
    bound = fit["model_bytes"] + 3 * largest + 150 * MB
    print(f"\nTrainer(strategy='qlora'), one step: peak growth {fit['peak_growth'] / MB:.0f} MB "
          f"(bound {bound / MB:.0f}, float model {float_bytes / MB:.0f})")
    assert fit["steps"] == 1 and fit["n_lora_b"] == 7 * BIG["num_hidden_layers"] and fit["lora_b_moved"]
    assert torch.isfinite(torch.tensor(fit["loss"]))
    assert fit["peak_growth"] <= bound


# ------------------------------------------------------------------------- small, in-process
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=128)


def _tiny(tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()


def _meta_tiny(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lightning_peft as lp

    with lp.empty_init():
        return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()


def _save(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))


def test_empty_init_builds_parameters_on_meta_for_free_and_keeps_buffers_real():
    import lightning_peft as lp

    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(20_000, 20_000)  # 1.6 GB in fp32
            self.register_buffer("table", torch.arange(4.0) * 2, persistent=False)

    before = _rss_now()
    with lp.empty_init():
        module = WithBuffer()
    assert module.proj.weight.is_meta and module.proj.bias.is_meta
    assert torch.equal(module.table, torch.tensor([0.0, 2.0, 4.0, 6.0]))
    assert _rss_now() - before < 50 * MB
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch is gone afterwards


def test_sharded_file_and_directory_forms_load_the_same_bytes(tmp_path):
    import lightning_peft as lp

    reference = _tiny()
    state = reference.state_dict()
    keys = list(state)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    for i, part in enumerate((keys[:7], keys[7:])):
        _save({k: state[k] for k in part}, shard_dir / f"part{i}.safetensors")
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f"part{int(k not in keys[:7])}.safetensors" for k in keys}}))
    single = _save(state, tmp_path / "single.safetensors")
    lp.quantize_base(reference, lp.QuantConfig())
    for path in (shard_dir, shard_dir / "model.safetensors.index.json", single):
        model = lp.load_quantized(_meta_tiny(), path, lp.QuantConfig(), device="cpu")
        assert _digest(model) == _digest(reference), path
        assert not any(p.requires_grad for p in model.parameters())
        assert lp.quantize.quant_config(model) == lp.QuantConfig()


def test_float_load_without_quantization_equals_load_state_dict(tmp_path):
    import lightning_peft as lp

    reference = _tiny()
    path = _save(reference.state_dict(), tmp_path / "model.safetensors")
    model = lp.load_quantized(_meta_tiny(), path, None)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(p.requires_grad for p in model.parameters())  # as built: nothing was quantized or frozen
    assert torch.equal(model(_ids()).logits, reference(_ids()).logits)


def test_tied_embeddings_stay_tied_and_match_quantize_base(tmp_path):
    import lightning_peft as lp

    reference = _tiny(tie=True)
    reference.save_pretrained(tmp_path / "tied")  # writes model.embed_tokens.weight only
    model = lp.load_quantized(_meta_tiny(tie=True), tmp_path / "tied", lp.QuantConfig(), device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta
    lp.quantize_base(reference, lp.QuantConfig())
    assert torch.equal(model(_ids()).logits, reference(_ids()).logits)


def test_rotary_inv_freq_is_real_and_an_old_checkpoints_copy_is_ignored(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lightning_peft as lp

    reference = _tiny()
    state = {**reference.state_dict(), "model.rotary_emb.inv_freq": torch.zeros(8)}  # as old checkpoints hold it
    path = _save(state, tmp_path / "model.safetensors")
    model = lp.load_quantized(_meta_tiny(), path, lp.QuantConfig(), device="cpu")
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)  # not the file's zeros

    with torch.device("meta"):  # plain meta construction: inv_freq is meta, and no checkpoint has it
        on_meta = LlamaForCausalLM(LlamaConfig(**TINY))
    with pytest.raises(ValueError, match=r"(?s)non-persistent buffers on the meta device.*inv_freq.*lp.empty_init"):
        lp.load_quantized(on_meta, path, lp.QuantConfig())


BAD = {
    "missing": (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), ["missing from the checkpoint (1)",
                                                                        "model.layers.1.mlp.up_proj.weight"]),
    "extra": (lambda s: s.update({"model.layers.9.adapter.weight": torch.zeros(3)}),
              ["in the checkpoint but not in the model (1)", "model.layers.9.adapter.weight"]),
    "shape": (lambda s: s.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 32)}),
              ["shape mismatch (1)", "model.layers.0.self_attn.q_proj.weight: checkpoint (64, 32) vs model (64, 64)"]),
}


@pytest.mark.parametrize("problems", [["missing"], ["extra"], ["shape"], ["missing", "extra", "shape"]])
def test_bad_checkpoint_lists_every_problem_in_one_error_and_leaves_the_model_untouched(tmp_path, problems):
    import lightning_peft as lp

    state = dict(_tiny().state_dict())
    for name in problems:
        BAD[name][0](state)
    path = _save(state, tmp_path / "bad.safetensors")
    model = _meta_tiny()
    before = {name: (id(t), t.device.type) for name, t in model.state_dict(keep_vars=True).items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as error:
        lp.load_quantized(model, path, lp.QuantConfig(), device="cpu")
    message = str(error.value)
    for name in problems:
        for expected in BAD[name][1]:
            assert expected in message
    assert "nothing was loaded" in message and "Build the model from the config" in message
    assert {name: (id(t), t.device.type) for name, t in model.state_dict(keep_vars=True).items()} == before
    assert [type(m) for m in model.modules()] == types
    assert lp.quantize.quant_config(model) is None


def test_not_a_safetensors_checkpoint_is_refused(tmp_path):
    import lightning_peft as lp

    torch.save(_tiny().state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled weights.*pytorch_model.bin"):
        lp.load_quantized(_meta_tiny(), tmp_path, lp.QuantConfig())
    with pytest.raises(ValueError, match="safetensors only"):
        lp.load_quantized(_meta_tiny(), tmp_path / "pytorch_model.bin", lp.QuantConfig())
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors file"):
        lp.load_quantized(_meta_tiny(), tmp_path / "broken.safetensors", lp.QuantConfig())


# ------------------------------------------------------------------------------- the strategy
class TinyLM:
    """A LightningModule (made lazily: lightning imports stay out of the workers) building a tiny
    Llama in configure_model."""

    @staticmethod
    def make(load_from: Path | None = None):
        import lightning as L
        from transformers import LlamaConfig, LlamaForCausalLM

        import lightning_peft as lp

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = None

            def configure_model(self):
                if self.model is None:
                    torch.manual_seed(0)
                    self.model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
                    if load_from is not None:
                        strategy = self.trainer.strategy
                        lp.load_quantized(self.model, load_from, strategy.quant_config, device=strategy.root_device)

            def training_step(self, batch, batch_idx):
                return self.model(input_ids=batch, labels=batch).loss

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        return Module()


def _fit(strategy, module, steps: int = 1):
    import lightning as L

    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(list(_ids()), batch_size=1))
    return trainer


def test_strategy_checkpoint_streams_the_base_in_before_injection(tmp_path):
    import lightning_peft as lp

    reference = _tiny()
    path = _save(reference.state_dict(), tmp_path / "model.safetensors")
    config = lp.QuantConfig(compute_dtype=torch.float32)
    module = TinyLM.make()
    strategy = lp.PEFTStrategy(peft_config=lp.LoraConfig(r=4), quantization=config, checkpoint=path,
                               gradient_checkpointing=True)
    trainer = _fit(strategy, module)
    assert trainer.global_step == 1
    assert module.model.model.gradient_checkpointing  # transformers' flag, set by the strategy
    lp.quantize_base(reference, config)
    # the base did not train, and is byte-identical
    assert _digest(module.model, base_only=True) == _digest(reference, base_only=True)


def test_module_loading_itself_in_configure_model_under_qlora(tmp_path):
    import lightning_peft as lp

    reference = _tiny()
    path = _save(reference.state_dict(), tmp_path / "model.safetensors")
    module = TinyLM.make(load_from=path)
    _fit("qlora", module)
    lp.quantize_base(reference, lp.QuantConfig(compute_dtype=torch.bfloat16))
    assert _digest(module.model, base_only=True) == _digest(reference, base_only=True)


def test_meta_model_without_weights_is_refused_and_empty_init_false_opts_out():
    import lightning_peft as lp

    with pytest.raises(RuntimeError, match=r"(?s)meta device.*checkpoint=.*lp.load_quantized.*empty_init=False"):
        _fit("qlora", TinyLM.make())
    module = TinyLM.make()
    _fit(lp.PEFTStrategy(quantization="nf4", empty_init=False), module)  # real random weights, as before
    assert not any(t.is_meta for t in module.state_dict().values())


# ------------------------------------------------------------------------ gradient checkpointing
class Blocks(torch.nn.Module):
    """Not a transformers model: embedding, a ModuleList of residual MLP blocks, a head."""

    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                                              torch.nn.Linear(2 * width, width)) for _ in range(depth))
        self.head = torch.nn.Linear(width, 50)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _grads(model, loss_fn, layer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """Adapter gradients of one step (fixed RNG: the same dropout masks) and how many times
    ``layer`` ran forward."""
    calls = []
    handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))  # a recompute may stop early, mid-layer
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss_fn(model).backward()
    handle.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("kind", ["transformers", "plain"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    import lightning_peft as lp
    from conftest import realistic_adapter

    if kind == "transformers":
        model = _tiny()
        lp.quantize_base(model, lp.QuantConfig(compute_dtype=torch.float32))
        loss_fn = lambda m: m(input_ids=_ids(), labels=_ids()).loss  # noqa: E731
        layer_of = lambda m: m.model.layers[1].mlp  # noqa: E731
    else:
        model = Blocks()
        loss_fn = lambda m: m(_ids() % 50).pow(2).mean()  # noqa: E731
        layer_of = lambda m: m.blocks[1][2]  # noqa: E731
    lp.inject_adapters(model, lp.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    realistic_adapter(model)
    model.train()
    plain, plain_calls = _grads(model, loss_fn, layer_of(model))
    lp.enable_gradient_checkpointing(model)
    checkpointed, checkpointed_calls = _grads(model, loss_fn, layer_of(model))
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer is recomputed in backward
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        scale = plain[name].abs().max().item()
        assert scale > 0, name
        assert (plain[name] - checkpointed[name]).abs().max().item() <= 1e-6 * scale, name


def test_big_70b_script_runs_at_the_quick_size(tmp_path):
    out = tmp_path / "big.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "big_70b.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "| 2 layers, hidden 64 |" in table and "estimate_memory" in table
    assert "loss" in done.stdout and "nan" not in done.stdout


if __name__ == "__main__":
    torch.set_num_threads(1)
    WORKERS[sys.argv[1]](*sys.argv[2:])
