"""Every example and benchmark script runs as written, on tiny settings."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_learns_reloads_and_merges():
    main = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))["main"]
    result = main(["--steps", "40"])
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert result["reload_diff"] <= 1e-6
    assert result["merge_diff"] <= 1e-4


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_runs_quick(script, tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|" in out.read_text()


def test_callbacks_example_uses_all_three(tmp_path):
    main = runpy.run_path(str(ROOT / "examples" / "callbacks.py"))["main"]
    result = main(["--steps", "20", "--out", str(tmp_path)])
    assert result["optimizer"] == "PagedAdamW8bit"
    assert {p.name for p in (tmp_path / "adapters" / "last").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "lightning_peft_checksums.json", "training_state.ckpt",
        "README.md"}
    assert Path(result["best"]).is_dir()
    assert (tmp_path / "merged" / "model.safetensors").is_file() and result["merge_error"] <= 1e-2


def test_serve_adapters_mixed_batch_answers_each_row_as_its_adapter_alone():
    main = runpy.run_path(str(ROOT / "examples" / "serve_adapters.py"))["main"]
    result = main(["--steps", "40"])
    assert result["accuracy"] >= 0.9 and result["base_accuracy"] <= 0.25  # the adapters learned; the base did not
    assert result["logit_diff"] <= 1e-5 and result["same_tokens"]
    assert result["swapped_accuracy"] >= 0.9 and result["pointers_kept"]


def test_sft_chat_example_trains_guards_exports(tmp_path):
    main = runpy.run_path(str(ROOT / "examples" / "sft_chat.py"))["main"]
    result = main(["--steps", "3", "--examples", "120", "--out", str(tmp_path)])
    stats = result["stats"]
    assert stats["records read"] == 123 and stats["overlapping eval (dropped)"] >= 3  # the three leaked items
    assert (Path(result["adapter"]) / "adapter_model.safetensors").is_file()
    assert (Path(result["merged"]) / "model.safetensors").is_file()
    review = Path(result["review"]).read_text()
    assert review.count("## example") == 50 and "<|im_end|>" in review
    assert result["last_loss"] < result["first_loss"]
