"""ContaminationGuard / find_contamination / drop_contaminated: 7 leaked examples planted among 1,000
training examples (and 3 duplicate copies) are found exactly, through the functions and a Trainer."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader, IterableDataset, Subset
from transformers import PreTrainedTokenizerFast

from lightning_peft.callbacks.contamination_guard import ContaminationGuard, drop_contaminated, find_contamination

ROOT = Path(__file__).resolve().parents[1]
VOCAB, LENGTH = 128, 24
LEAKED = [3, 50, 200, 401, 555, 808, 999]
DUPLICATES = {5: [600, 700], 10: [800]}  # source -> copies: 2 groups, 3 redundant copies


def planted():
    """1,000 training examples (1-D tensors) and 100 evaluation examples (lists of ints), all of 24
    random tokens; training example LEAKED[k] carries 13 tokens of evaluation example 10 k."""
    g = torch.Generator().manual_seed(0)
    train = list(torch.randint(0, VOCAB, (1000, LENGTH), generator=g))
    evals = torch.randint(0, VOCAB, (100, LENGTH), generator=g).tolist()
    for k, i in enumerate(LEAKED):
        train[i] = train[i].clone()
        train[i][4:17] = torch.tensor(evals[10 * k][2:15])
    for source, copies in DUPLICATES.items():
        for i in copies:
            train[i] = train[source].clone()
    return train, evals


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token i <-> word "w{i}", split on whitespace: text and ids describe the same sequences."""
    tok = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(VOCAB)}, "[UNK]": VOCAB}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def as_text(ids) -> str:
    return " ".join(f"w{int(t)}" for t in ids)


def test_finds_exactly_the_planted_leaks_and_duplicates():
    train, evals = planted()
    report = find_contamination(train, evals)
    assert report.n_contaminated == 7 and report.train_indices == LEAKED
    assert report.matches == {i: 10 * k for k, i in enumerate(LEAKED)}
    assert report.eval_indices == [10 * k for k in range(7)]
    assert report.duplicate_groups == [[5, 600, 700], [10, 800]] and report.n_duplicates == 3
    assert (report.n_train, report.n_eval, report.ngram) == (1000, 100, 13)
    summary = report.summary(train, evals)
    assert "7 of 1,000 training examples share a 13-token sequence with 7 of 100 evaluation examples" in summary
    assert f"train[3] and eval[0] share ids {evals[0][2:15]}" in summary
    assert "3 redundant copies in 2 groups" in summary and "train[5] == train[600] == train[700]" in summary
    # 12 shared tokens are not a 13-gram
    assert find_contamination(train, evals, ngram=14).train_indices == []


def test_drop_contaminated_removes_exactly_those():
    train, evals = planted()
    clean = drop_contaminated(train, evals)
    assert isinstance(clean, Subset) and clean.dataset is train
    assert clean.indices == [i for i in range(1000) if i not in LEAKED]
    assert find_contamination(clean, evals).n_contaminated == 0


def test_text_dict_and_tokenizer_formats_agree():
    train, evals = planted()
    text_train = [as_text(t) for t in train]
    text_eval = [{"text": as_text(e)} for e in evals]
    by_words = find_contamination(text_train, text_eval)
    tokenizer = word_tokenizer()
    by_tokens = find_contamination(text_train, text_eval, tokenizer=tokenizer)
    by_ids = find_contamination([{"input_ids": t} for t in train], evals, tokenizer=tokenizer)
    for report in (by_words, by_tokens, by_ids):
        assert report.train_indices == LEAKED and report.n_duplicates == 3
    shared = " ".join(f"w{t}" for t in evals[0][2:15])
    assert f"train[3] and eval[0] share '{shared}'" in by_words.summary(text_train, text_eval)  # text as text
    assert f"train[3] and eval[0] share '{shared}'" in by_ids.summary(train, evals, tokenizer)  # ids decoded
    with pytest.raises(ValueError, match="pass tokenizer="):
        find_contamination(text_train, evals)


def test_short_examples_are_compared_whole_and_padding_never_matches():
    train = ["two plus two is four", "a long example that mentions two plus two is four and more", "unrelated"]
    evals = ["two plus two is four", "unrelated words"]
    report = find_contamination(train, evals, ngram=13)
    assert report.train_indices == [0] and report.matches == {0: 0}  # identical short examples match
    padded = [{"input_ids": [7, 8, 9] + [0] * 20, "attention_mask": [1] * 3 + [0] * 20}]
    padded_eval = [{"input_ids": [5, 6] + [0] * 21, "attention_mask": [1] * 2 + [0] * 21}]
    assert find_contamination(padded, padded_eval).n_contaminated == 0  # 20 pads in a row are no 13-gram


def test_unsupported_data_says_what_is_accepted():
    class Stream(IterableDataset):
        def __iter__(self):
            yield [1, 2, 3]

    with pytest.raises(TypeError, match="has no len\\(\\): contamination is checked on map-style datasets"):
        find_contamination(Stream(), [])
    with pytest.raises(TypeError, match=r"train\[1\] is a 2-D torch.int64 tensor; .*token ids"):
        find_contamination([torch.arange(3), torch.zeros(2, 3, dtype=torch.long)], [])
    with pytest.raises(TypeError, match=r"eval\[0\] is a dict with keys \['label'\]"):
        find_contamination([], [{"label": 1}])
    with pytest.raises(ValueError, match="on_hit='ignore'.*'warn', 'raise', 'drop'"):
        ContaminationGuard(on_hit="ignore")
    with pytest.raises(ValueError, match="ngram=0"):
        ContaminationGuard(ngram=0)


class Recorder(L.LightningModule):
    """Records the training examples it is fed."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch)
        return (self.weight - batch.float().mean()) ** 2

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(guard, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
    return L.Trainer(callbacks=[guard], **{**defaults, **kwargs})


def _fit(guard, train, val, module=None, **kwargs):
    module = module or Recorder()
    trainer = _trainer(guard, **kwargs)
    trainer.fit(module, DataLoader(train, batch_size=100, shuffle=True), val)
    return trainer, module


def _val(evals, batch_size=50):
    return DataLoader([torch.tensor(e) for e in evals], batch_size=batch_size)


def test_trainer_raise_stops_before_training_with_count_and_example():
    train, evals = planted()
    module = Recorder()
    with pytest.raises(RuntimeError) as error:
        _fit(ContaminationGuard(on_hit="raise"), train, _val(evals), module)
    message = str(error.value)
    assert "7 of 1,000 training examples share a 13-token sequence with 7 of 100 evaluation examples" in message
    assert f"train[3] and val[0] share ids {evals[0][2:15]}" in message
    assert "drop_contaminated" in message
    assert module.seen == []  # before the first step


def test_trainer_warn_reports_and_trains_on_everything():
    train, evals = planted()
    guard = ContaminationGuard(on_hit="warn", tokenizer=word_tokenizer())
    with pytest.warns(UserWarning, match="7 of 1,000 training examples") as record:
        _, module = _fit(guard, train, [_val(evals[:60]), _val(evals[60:])])  # two validation dataloaders
    message = next(str(w.message) for w in record if "ContaminationGuard" in str(w.message))
    assert "train[3] and val dataloader 0[0] share 'w" in message  # decoded by the tokenizer
    assert "3 redundant copies in 2 groups" in message
    assert guard.report.train_indices == LEAKED and len(module.seen) == 1000


def test_trainer_drop_trains_without_the_leaked_examples():
    train, evals = planted()
    guard = ContaminationGuard(on_hit="drop")
    with pytest.warns(UserWarning, match="Dropped the 7 contaminated examples: training on 993"):
        trainer, module = _fit(guard, train, _val(evals), max_epochs=2)
    assert isinstance(trainer.train_dataloader.dataset, Subset) and len(trainer.train_dataloader.dataset) == 993
    assert trainer.num_training_batches == 10 and trainer.global_step == 20  # ceil(993 / 100), per epoch
    seen = {tuple(x.tolist()) for x in module.seen}
    assert len(module.seen) == 2 * 993
    assert not seen & {tuple(train[i].tolist()) for i in LEAKED}
    assert seen == {tuple(t.tolist()) for i, t in enumerate(train) if i not in LEAKED}  # duplicates stay


def test_drop_refuses_a_loader_it_cannot_rebuild():
    train, evals = planted()
    loader = DataLoader(train, batch_sampler=[list(range(k, k + 100)) for k in range(0, 1000, 100)])
    trainer = _trainer(ContaminationGuard(on_hit="drop"))
    with pytest.raises(TypeError, match="Build your loader from lightning_peft.callbacks.drop_contaminated"):
        trainer.fit(Recorder(), loader, _val(evals))


def test_without_validation_data_only_duplicates_are_checked():
    train, _ = planted()
    with pytest.warns(UserWarning, match="No validation dataloader was set up at train start") as record:
        _fit(ContaminationGuard(on_hit="raise"), train, None)
    assert any("3 redundant copies" in str(w.message) for w in record)


def test_dataloaders_exist_at_train_start_not_at_fit_start():
    """Why the guard scans in on_train_start: Lightning sets the dataloaders up inside the fit loop."""
    seen = {}

    class Probe(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["fit_start"] = (trainer.train_dataloader, trainer.val_dataloaders)

        def on_train_start(self, trainer, pl_module):
            seen["train_start"] = (trainer.train_dataloader, trainer.val_dataloaders)

    train, evals = planted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(Probe(), train, _val(evals), max_steps=1)
    assert seen["fit_start"] == (None, None)
    assert all(isinstance(loader, DataLoader) for loader in seen["train_start"])


def test_benchmark_quick_writes_a_markdown_table(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "contamination.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| format | train examples |") and lines[1].startswith("|---|")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["tensors", "dicts", "text"]
    assert all("| 7 / 7 | 5 |" in line for line in lines[2:])
