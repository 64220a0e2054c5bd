"""EpochGuard and OverfittingGuard, each triggered on purpose on a tiny Llama on the CPU.

The overfitting task: the model memorises 16 random sequences (LoRA r=16 on a 2-layer Llama,
vocabulary 32). Validation runs on the same inputs with half of the labels replaced by random
tokens. If the model gives a memorised next token probability p, the validation cross-entropy per
token is about ``0.5 * -log(p) + 0.5 * -log((1 - p) / 31)``: it falls while p grows to 0.5, then
rises without bound as the model grows more confident, while the training loss (``-log(p)``) keeps
falling. Full-batch order (no shuffling), no dropout, a fixed seed: the curves are the same on
every run.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_peft as lp
from lightning_peft.callbacks.epoch_guard import EpochGuard
from lightning_peft.callbacks.overfitting_guard import OverfittingGuard
from lightning_peft.inject import adapter_parameters
from plain_module import CausalLM, sequences

VOCAB, MAX_EPOCHS = 32, 30


def _trainer(callbacks=(), **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


class NoisyLabelLM(CausalLM):
    """Batches are ``(input_ids, labels)``; the module injects its own adapters (default strategy)."""

    def __init__(self, train_log=None, **kwargs):
        super().__init__(vocab=VOCAB, **kwargs)
        lp.inject_adapters(self.model, lp.LoraConfig(r=16, lora_dropout=0.0))
        self.train_log = train_log or {}  # self.log options for the training loss
        self.val_losses: list[float] = []  # one per evaluation, before any restore

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        loss = self.model(input_ids=inputs, labels=labels).loss
        self.log("train_loss", loss, **self.train_log)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.log("val_loss", self.model(input_ids=inputs, labels=labels).loss)

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking and "val_loss" in self.trainer.callback_metrics:
            self.val_losses.append(self.trainer.callback_metrics["val_loss"].item())


def noisy_label_data(n=16, seq=16, noise=0.5):
    """(train loader, validation loader): the same inputs; in validation a fraction ``noise`` of the
    labels is replaced by random tokens."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (n, seq), generator=generator)
    noisy = inputs.clone()
    replace = torch.rand(inputs.shape, generator=generator) < noise
    noisy[replace] = torch.randint(0, VOCAB, (int(replace.sum()),), generator=generator)
    return (DataLoader(list(zip(inputs, inputs)), batch_size=8),
            DataLoader(list(zip(inputs, noisy)), batch_size=8))


def _adapters(module):
    """The tensors that train, by state-dict name (what the guard copies)."""
    return {k: t.detach().clone() for k, t in adapter_parameters(module, "default").items()}


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """One guarded fit, a checkpoint after every epoch (for the resume test)."""
    directory = tmp_path_factory.mktemp("overfit")
    L.seed_everything(0)
    module, guard = NoisyLabelLM(), OverfittingGuard(patience=2)
    trainer = _trainer([guard, ModelCheckpoint(dirpath=directory, save_top_k=-1, filename="{epoch}")],
                       max_epochs=MAX_EPOCHS, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, *noisy_label_data())
    messages = [str(w.message) for w in caught if "OverfittingGuard" in str(w.message)]
    return dict(module=module, guard=guard, trainer=trainer, messages=messages, directory=directory,
                adapters=_adapters(module))


# ------------------------------------------------------------------------------- OverfittingGuard
def test_overfitting_guard_stops_and_restores_best_adapters(overfit_run):
    module, guard, trainer = overfit_run["module"], overfit_run["guard"], overfit_run["trainer"]
    losses = list(module.val_losses)  # validate() below appends one more
    # it stopped early, 2 evaluations (patience=2) after the best one
    assert guard.stopped_epoch is not None and trainer.current_epoch == guard.stopped_epoch + 1 < MAX_EPOCHS
    assert losses[-1] > losses[-2] > losses[-3] and losses[-1] > guard.best_score + 0.05  # real overfitting
    assert guard.best_epoch == min(range(len(losses)), key=losses.__getitem__) <= guard.stopped_epoch - 2
    assert guard.best_score == pytest.approx(min(losses), abs=1e-7)
    # the live adapters are the best copy again, and they compute the best validation loss
    assert guard.restored
    best = guard.state_dict()["best_adapters"]["default"]  # the CPU copy taken at the best evaluation
    assert best.keys() == overfit_run["adapters"].keys()
    assert all(torch.equal(best[k], t) for k, t in overfit_run["adapters"].items())
    recomputed = _trainer().validate(module, noisy_label_data()[1], verbose=False)[0]["val_loss"]
    assert abs(recomputed - guard.best_score) <= 1e-6
    assert abs(recomputed - losses[-1]) > 0.05  # what the model held before the restore was worse
    [message] = overfit_run["messages"]
    assert ("val_loss has not improved on its best for 2 evaluations (patience 2" in message
            and "while train_loss fell" in message
            and f"stopping at epoch {guard.stopped_epoch}, adapters restored to epoch {guard.best_epoch} "
                f"(val_loss {guard.best_score:.4f})" in message)


def test_overfitting_guard_needs_the_training_loss_to_fall():
    """Same task, but the 'training loss' the guard watches rises each epoch: the validation loss
    still rises, and this is not overfitting, so the guard must not stop."""

    class RisingTrainLoss(NoisyLabelLM):
        def training_step(self, batch, batch_idx):
            self.log("rising", float(self.current_epoch))
            return super().training_step(batch, batch_idx)

    module, guard = RisingTrainLoss(), OverfittingGuard(train_monitor="rising")
    _trainer([guard], max_epochs=14).fit(module, *noisy_label_data())
    assert module.val_losses[-1] > min(module.val_losses) + 0.1  # the validation loss did rise
    assert guard.stopped_epoch is None and not guard.restored and len(module.val_losses) == 14


class ScriptedValLoss(CausalLM):
    """The validation loss follows a script (one value per evaluation); the training loss is real."""

    SCRIPT = [1.0, 0.8, 0.85, 0.82, 0.84, 0.81, 0.9, 0.95]

    def __init__(self):
        super().__init__(layers=1)
        lp.inject_adapters(self.model, lp.LoraConfig(r=4, lora_dropout=0.0))

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.SCRIPT[self.current_epoch])


def test_overfitting_guard_patience_counts_evaluations_without_a_new_best():
    """Best at epoch 1 (0.8); then 0.85, 0.82, 0.84: three evaluations without a new best, though
    never two rises in a row. The default patience (3, as EarlyStopping's) stops at epoch 4 and
    restores epoch 1; a rule of consecutive rises would have gone on to epoch 7."""
    module, guard = ScriptedValLoss(), OverfittingGuard()
    assert guard.patience == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([guard], max_epochs=len(ScriptedValLoss.SCRIPT)).fit(module, sequences(n=8), sequences(n=8))
    assert (guard.best_epoch, guard.best_score, guard.stopped_epoch) == (1, pytest.approx(0.8), 4)
    assert guard.restored
    [message] = [str(w.message) for w in caught if "OverfittingGuard" in str(w.message)]
    assert "not improved on its best for 3 evaluations (patience 3; val_loss 0.8000 -> 0.8500 -> 0.8200 -> 0.8400)" \
        in message and "train_loss fell" in message


# ------------------------------------------------------------------------------- resume
def test_overfitting_guard_state_survives_state_dict_and_checkpoint_resume(overfit_run):
    guard = overfit_run["guard"]
    copy = OverfittingGuard()
    copy.load_state_dict(guard.state_dict())
    assert (copy.best_score, copy.best_epoch, copy.wait_count, copy.history, copy.stopped_epoch) == (
        guard.best_score, guard.best_epoch, guard.wait_count, guard.history, guard.stopped_epoch)
    best, best_copy = (g.state_dict()["best_adapters"]["default"] for g in (guard, copy))
    assert best.keys() == best_copy.keys() and all(torch.equal(best_copy[k], t) for k, t in best.items())

    # the checkpoint written after the first of the two rises: count 1, best copy from an earlier epoch
    resume_epoch = guard.stopped_epoch - 1
    path = overfit_run["directory"] / f"epoch={resume_epoch}.ckpt"
    saved = torch.load(path, weights_only=True)["callbacks"][guard.state_key]
    assert saved["wait_count"] == 1 and saved["best_epoch"] == guard.best_epoch < resume_epoch
    assert [entry["epoch"] for entry in saved["history"]] == [resume_epoch - 2, resume_epoch - 1, resume_epoch]

    L.seed_everything(0)
    module, resumed = NoisyLabelLM(), OverfittingGuard(patience=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([resumed], max_epochs=MAX_EPOCHS).fit(module, *noisy_label_data(), ckpt_path=path)
    # one evaluation, then the stop; had the count or the history been lost, it would take 2 or 3
    assert len(module.val_losses) == 1
    assert (resumed.stopped_epoch, resumed.best_epoch) == (guard.stopped_epoch, guard.best_epoch)
    assert resumed.best_score == guard.best_score
    # the best tensors were never computed in this process: they came from the checkpoint
    assert resumed.restored
    assert all(torch.equal(t, overfit_run["adapters"][k]) for k, t in _adapters(module).items())


# ------------------------------------------------------------------------------- EpochGuard
class EpochRecorder(L.Callback):
    """Placed after the guard: the EpochGuard warnings seen so far, at the start of each epoch."""

    def __init__(self, caught):
        self.caught, self.seen = caught, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(sum("EpochGuard: starting" in str(w.message) for w in self.caught))


def _fit_with_epoch_guard(guard, max_epochs, root, ckpt_path=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder = EpochRecorder(caught)
        trainer = _trainer([guard, recorder], max_epochs=max_epochs, enable_checkpointing=True,
                           default_root_dir=root)
        trainer.fit(CausalLM(layers=1), sequences(n=8), ckpt_path=ckpt_path)
    return trainer, recorder.seen, [str(w.message) for w in caught if "EpochGuard" in str(w.message)]


def test_epoch_guard_stops_after_epoch_3_and_says_why(tmp_path):
    trainer, seen, messages = _fit_with_epoch_guard(EpochGuard(), max_epochs=10, root=tmp_path)
    assert trainer.current_epoch == 3 and seen == [0, 0, 0]  # 3 epochs; nothing said within the bound
    [stop] = messages
    assert "stopping after epoch 3 (Trainer max_epochs=10)" in stop
    assert "1-3 epochs" in stop and "overfit" in stop and "EpochGuard(max_epochs=5)" in stop


def test_epoch_guard_says_nothing_within_its_bound_and_warns_early_only_when_asked(tmp_path):
    trainer, seen, messages = _fit_with_epoch_guard(EpochGuard(), max_epochs=3, root=tmp_path / "a")
    assert trainer.current_epoch == 3 and messages == []  # the user chose the recipe's 3 epochs: no warning
    trainer, seen, messages = _fit_with_epoch_guard(EpochGuard(warn_at=2), max_epochs=10, root=tmp_path / "b")
    assert trainer.current_epoch == 3 and seen == [0, 1, 1]  # the early warning came as epoch 2 started
    warning, stop = messages
    assert "starting epoch 2" in warning and "1-3 epochs" in warning and "stops after epoch 3" in warning


def test_epoch_guard_resumes_without_warning_twice(tmp_path):
    """A 2-epoch run ends by itself (no stop message); resumed with max_epochs=10 it runs one more
    epoch, and the warning it gave is not given again."""
    first, _, messages = _fit_with_epoch_guard(EpochGuard(warn_at=2), max_epochs=2, root=tmp_path / "a")
    assert first.current_epoch == 2 and [m for m in messages if "stopping" in m] == []
    [path] = (tmp_path / "a").rglob("*.ckpt")
    guard = EpochGuard(warn_at=2)
    trainer, seen, messages = _fit_with_epoch_guard(guard, max_epochs=10, root=tmp_path / "b", ckpt_path=path)
    assert guard.warned and trainer.current_epoch == 3 and seen == [0]
    assert len(messages) == 1 and "stopping after epoch 3" in messages[0]


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, fix", [
    (dict(max_epochs=0), "whole number of epochs >= 1"),
    (dict(max_epochs=2.5), "whole number of epochs >= 1"),
    (dict(warn_at=0), "warn_at=None for no warning"),
    (dict(max_epochs=3, warn_at=4), r"pass warn_at <= 3 \(e.g. warn_at=3\) or warn_at=None"),
    (dict(max_epochs=1, warn_at=2), r"pass warn_at <= 1"),
])
def test_epoch_guard_bad_arguments(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        EpochGuard(**kwargs)


@pytest.mark.parametrize("kwargs, fix", [
    (dict(monitor=""), "monitor='val_loss'"),
    (dict(train_monitor=3), "train_monitor='train_loss', or None"),
    (dict(train_monitor="val_loss"), "the two must differ"),
    (dict(patience=0), "patience=3"),
    (dict(patience=True), "patience=3"),
    (dict(min_delta=-0.1), "finite number >= 0"),
    (dict(min_delta=float("nan")), "finite number >= 0"),
])
def test_overfitting_guard_bad_arguments(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        OverfittingGuard(**kwargs)


@pytest.mark.parametrize("guard, train_log, expected", [
    (OverfittingGuard(monitor="val_los"), None, ["monitors 'val_los'", "Available: ", "'train_loss'", "'val_loss'"]),
    (OverfittingGuard(train_monitor="train_los"), None, ["compares 'train_los'", "'train_loss'", "'val_loss'"]),
    # logged per epoch only: that value is updated after the validation, so the guard cannot use it
    (OverfittingGuard(), dict(on_step=False, on_epoch=True), ["compares 'train_loss'", "on_step=True"]),
])
def test_overfitting_guard_missing_metric_lists_available_keys(guard, train_log, expected):
    with pytest.raises(RuntimeError) as err:
        _trainer([guard], max_epochs=2).fit(NoisyLabelLM(train_log=train_log), *noisy_label_data(n=8))
    assert all(text in str(err.value) for text in expected), str(err.value)


def test_overfitting_guard_without_adapters_says_what_to_do():
    with pytest.raises(RuntimeError, match="no adapters to restore.*strategy='lora'"):
        _trainer([OverfittingGuard()], max_epochs=1).fit(CausalLM(layers=1), sequences(n=8), sequences(n=8))
