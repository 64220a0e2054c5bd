"""Untrusted files and names (issue 18, points 1, 2, 5, 8, 9): pickles that would run code, adapter
names that are paths, config values that cannot be right, malformed adapter_config.json files,
corrupted tensor files, and the CLI's answer to all of them."""

from __future__ import annotations

import json
import math
import warnings

import lightning as L
import pytest
import torch

import lightning_peft as lp
from conftest import tiny_llama
from lightning_peft.callbacks import AdapterCheckpoint
from lightning_peft.checkpoint import CHECKSUMS_NAME, CONFIG_NAME, TRAINING_STATE, WEIGHTS_NAME
from lightning_peft.inject import CONFIGS_ATTR
from plain_module import CausalLM, sequences


class _RunsCode:
    """A pickle whose ``__reduce__`` creates a file: unpickling it runs ``open(marker, "w")``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _evil_checkpoint(path, marker) -> None:
    torch.save({"state_dict": {}, "lightning_peft": {"adapters": _RunsCode(marker)}}, path)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(**{"strategy": "lora", "max_steps": 2, "logger": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "default_root_dir": tmp_path, **kwargs})


# ------------------------------------------------------------------------- 1: pickles never run code
def test_restore_adapters_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "ran"
    _evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError) as err:
        lp.restore_adapters(CausalLM(hidden=32, layers=1), tmp_path / "evil.ckpt")
    assert not marker.exists()
    message = str(err.value)
    assert "evil.ckpt" in message and "weights_only=True" in message and "arbitrary code" in message


@pytest.mark.parametrize("as_directory", [False, True])
def test_resume_refuses_a_pickle_that_runs_code(tmp_path, as_directory):
    marker = tmp_path / "ran"
    if as_directory:  # an AdapterCheckpoint save whose training state was replaced
        path = tmp_path / "save"
        path.mkdir()
        _evil_checkpoint(path / TRAINING_STATE, marker)
    else:
        path = tmp_path / "evil.ckpt"
        _evil_checkpoint(path, marker)
    with pytest.raises(ValueError, match="arbitrary code"):
        _trainer(tmp_path).fit(CausalLM(hidden=32, layers=1), sequences(n=16), ckpt_path=path)
    assert not marker.exists()


def test_real_checkpoints_load_with_weights_only_and_restore_from_a_directory(tmp_path):
    """Our strategy's .ckpt and AdapterCheckpoint's saves (optimizer and scheduler state, loops,
    callbacks' state, hparams) load with weights_only=True, with no safe globals added; both give
    the trained adapters back, and training resumes from both."""

    class Scheduled(CausalLM):
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}

    callbacks = [AdapterCheckpoint(dirpath=tmp_path / "adapters", every_n_train_steps=2),
                 L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2),
                 L.pytorch.callbacks.EarlyStopping(monitor="train_loss", patience=5)]
    trained = Scheduled(hidden=32, layers=1)
    _trainer(tmp_path, callbacks=callbacks).fit(trained, sequences(n=16))
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    save = tmp_path / "adapters" / "last"
    for path in (ckpt, save / TRAINING_STATE):
        loaded = torch.load(path, weights_only=True)
        assert {"optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters"} <= loaded.keys()
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        expected = trained.eval()(x)
        for path in (ckpt, save):
            restored = lp.restore_adapters(Scheduled(hidden=32, layers=1), path).eval()
            torch.testing.assert_close(restored(x), expected)
    for path in (ckpt, save):
        _trainer(tmp_path, callbacks=[AdapterCheckpoint(dirpath=tmp_path / "again")], max_steps=4).fit(
            Scheduled(hidden=32, layers=1), sequences(n=16), ckpt_path=path)


def test_an_empty_training_state_names_the_file(tmp_path):
    (tmp_path / TRAINING_STATE).write_bytes(b"")
    with pytest.raises(ValueError, match=f"{TRAINING_STATE}.*empty"):
        lp.restore_adapters(CausalLM(hidden=32, layers=1), tmp_path)


# --------------------------------------------------------------------- 2: names are one path component
BAD_NAMES = ["a/b", "/tmp/x", "a\\b", "..", "", "tab\there", "nul\x00", "é" * 128, "c:d", 3]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_adapter_names_that_are_not_one_path_component_are_refused_everywhere(tmp_path, name):
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=2, target_modules=["q_proj"]), "default")
    lp.save_adapter(model, tmp_path / "saved")
    calls = {
        "inject": lambda: lp.inject_adapters(model, lp.LoraConfig(r=2, target_modules=["v_proj"]), name),
        "load": lambda: lp.load_adapter(model, tmp_path / "saved", adapter_name=name),
        "combine": lambda: lp.combine_adapters(model, ["default"], [1.0], new_name=name),
        "hot swap": lambda: lp.hot_swap_adapter(model, tmp_path / "saved", adapter_name=name),
        "save": lambda: lp.save_adapter(model, tmp_path / "out", adapter_name=name),
        "strategy": lambda: lp.PEFTStrategy(adapter_name=name),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match="adapter name|new_name|adapter_name") as err:
            call()
        assert "ValueError" not in str(err.value), where
    assert list(adapter for adapter in lp.inject.adapter_configs(model)) == ["default"]


def test_adapter_checkpoint_never_writes_outside_its_directory(tmp_path):
    """A name forged past inject_adapters (an absolute path) is refused at save: nothing is
    written there, and the save directory gets no partial save."""
    outside = tmp_path / "outside"
    module = CausalLM(hidden=32, layers=1)
    lp.inject_adapters(module.model, lp.LoraConfig(r=2, target_modules=["q_proj"]))
    lp.inject_adapters(module.model, lp.LoraConfig(r=2, target_modules=["v_proj"]), "second")
    configs = getattr(module.model, CONFIGS_ATTR)
    object.__setattr__(module.model, CONFIGS_ATTR, {"default": configs["default"], str(outside): configs["second"]})
    with pytest.raises(ValueError, match="one path component"):
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[AdapterCheckpoint(dirpath=tmp_path / "adapters", every_n_train_steps=1)]).fit(
            module, sequences(n=8))
    assert not outside.exists()
    assert not any(p.name.startswith(("epoch", "last")) for p in (tmp_path / "adapters").iterdir())


# ------------------------------------------------------------------------------ 5: config values
@pytest.mark.parametrize("kwargs, field", [
    (dict(lora_alpha=math.nan), "lora_alpha"), (dict(lora_alpha=math.inf), "lora_alpha"),
    (dict(lora_alpha=0), "lora_alpha"), (dict(alpha_pattern={"q_proj": math.nan}), "alpha_pattern"),
    (dict(alpha_pattern={"q_proj": -math.inf}), "alpha_pattern"), (dict(r=0), "r="),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=math.nan), "lora_dropout"), (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(lora_dropout=True), "lora_dropout"),
])
def test_config_values_that_cannot_be_right_are_refused_at_construction_and_at_load(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        lp.LoraConfig(**kwargs)
    lp.save_adapter(lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=2)), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, **kwargs}))  # json writes NaN / Infinity
    with pytest.raises(ValueError) as err:
        lp.load_adapter(tiny_llama(), tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(err.value) and field in str(err.value)


def test_fan_in_fan_out_on_linear_layers_is_corrected_with_a_warning():
    """PEFT's rule: nn.Linear stores [out, in], so fan_in_fan_out=True is set back to False with a
    warning; the adapter then merges into exactly the function it computes."""
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False"):
        model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=4, init_lora_weights=False, fan_in_fan_out=True,
                                                               target_modules=["q_proj", "o_proj"]))
    assert lp.inject.adapter_configs(model)["default"].fan_in_fan_out is False
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        before = model(x).logits
        lp.merge_adapters(model)
        torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("content, says", [
    (b"[1, 2]", "JSON list"), (b"null", "JSON NoneType"), (b'"LORA"', "JSON str"),
    (b'{"r": 4, "peft_type": "LORA", \xff}', "UTF-8"), (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"peft_type": "LORA", "r": "8"}', "r='8'"), (b'{"peft_type": "LORA", "target_modules": 5}', "target_modules"),
    (b'{"peft_type": "LORA", "modules_to_save": 5}', "modules_to_save"), (b'{"peft_type": ["LORA"]}', "peft_type"),
    (b'{"peft_type": "LORA", "rank_pattern": [1]}', "rank_pattern"), (b'{"peft_type": "LORA", "r": 4', "not valid JSON"),
])
def test_a_malformed_adapter_config_is_one_value_error_naming_file_and_field(tmp_path, content, says):
    lp.save_adapter(lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=2)), tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError) as err:
        lp.load_adapter(tiny_llama(), tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(err.value) and says in str(err.value)


# ------------------------------------------------------------------------------------- 9: checksums
def test_saves_record_a_sha256_that_load_verifies_and_peft_ignores(tmp_path):
    model = lp.inject_adapters(tiny_llama(), lp.LoraConfig(r=2, init_lora_weights=False))
    lp.save_adapter(model, tmp_path)
    sums = json.loads((tmp_path / CHECKSUMS_NAME).read_text())
    import hashlib
    assert sums["sha256"] == {WEIGHTS_NAME: hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()}

    from peft import PeftModel  # our directory, checksum file included, still loads in PEFT
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(x).logits,
                                   model.eval()(x).logits)

    data = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the last tensor: still a valid safetensors file
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256") as err:
        lp.load_adapter(tiny_llama(), tmp_path)
    assert str(tmp_path / WEIGHTS_NAME) in str(err.value)
    (tmp_path / CHECKSUMS_NAME).unlink()  # as PEFT's directories: no checksum, nothing to verify
    lp.load_adapter(tiny_llama(), tmp_path)


# -------------------------------------------------------------------------------------------- 8: CLI
def _cli(capsys, *argv) -> tuple[int, str]:
    from lightning_peft.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["config list", "config bad utf8", "config deep", "config nan alpha",
                                    "weights truncated", "weights flipped", "weights nan", "weights int",
                                    "config wrong type", "config rank", "config other method"])
def test_cli_inspect_and_merge_answer_bad_adapters_with_one_line(tmp_path, capsys, damage):
    directory = tmp_path / "adapter"
    from lightning_peft.toy import TinyCausalLM

    lp.save_adapter(lp.inject_adapters(TinyCausalLM().model, lp.LoraConfig(r=2)), directory)
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    data = weights.read_bytes()
    if damage == "config list":
        config.write_text("[]")
    elif damage == "config bad utf8":
        config.write_bytes(b'{"peft_type": "\xff"}')
    elif damage == "config deep":
        config.write_text("[" * 50000 + "]" * 50000)
    elif damage == "config nan alpha":
        config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": math.nan}))
    elif damage == "config wrong type":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": [4]}))
    elif damage == "config rank":  # valid alone, but not the rank of the file's factors
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": 4}))
    elif damage == "config other method":
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "IA3"}))
    elif damage == "weights truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "weights flipped":
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        from safetensors.torch import load_file, save_file
        tensors = load_file(weights)
        key = next(iter(tensors))
        tensors[key] = tensors[key].fill_(math.nan) if damage == "weights nan" else tensors[key].to(torch.int64)
        save_file(tensors, weights)
        (directory / CHECKSUMS_NAME).unlink()
    for argv in (["inspect", str(directory)],
                 ["merge", "--base", "lightning_peft.toy.TinyCausalLM", "--adapter", str(directory),
                  "--out", str(tmp_path / "merged")]):
        code, err = _cli(capsys, *argv)
        lines = err.splitlines()  # one error line, after any one-line warnings (fields ignored)
        assert code == 2 and lines[-1].startswith(f"lightning-peft {argv[0]}: error: "), (argv[0], err)
        assert all(line.startswith("lightning-peft: warning: ") for line in lines[:-1]), err
        assert not (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.parametrize("what", ["code", "empty", "missing"])
def test_cli_fit_answers_a_bad_ckpt_path_with_one_line(tmp_path, capsys, what):
    marker, path = tmp_path / "ran", tmp_path / "run.ckpt"
    if what == "code":
        _evil_checkpoint(path, marker)
    elif what == "empty":
        path.write_bytes(b"")
    code, err = _cli(capsys, "fit", "--model", "lightning_peft.toy.TinyCausalLM", "--model.hidden_size", "16",
                     "--data", "lightning_peft.toy.SyntheticTokens", "--trainer.strategy", "lora",
                     "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(path))
    lines = [line for line in err.splitlines() if line.startswith("lightning-peft")]
    assert code == 2 and lines[-1].startswith("lightning-peft fit: error: ") and str(path) in lines[-1], err
    assert "Traceback" not in err and not marker.exists()


# ----------------------------------------------------------------------------------- the sweep
def test_bad_input_sweep_gives_only_clear_errors(tmp_path):
    """scripts/reliability_inputs.py on every other input (the script alone runs all of them): each
    malformed directory or checkpoint ends in a clear error through every entry point, with nothing
    silent, nothing lost and no traceback."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "reliability_inputs", Path(__file__).parents[1] / "scripts" / "reliability_inputs.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    assert len(sweep.ADAPTER_INPUTS) + len(sweep.BAD_NAMES) + len(sweep.CHECKPOINT_INPUTS) >= 80
    rows = sweep.run_sweep(tmp_path, every=2)
    assert {row["entry"] for row in rows} == {"load_adapter", "inspect", "merge", "ckpt_path", "restore_adapters"}
    bad = [row for row in rows if row["outcome"] != "clear_error"]
    assert not bad, bad
